"""`facegen` command line: one parser, a subcommand per module of facegen_dist.commands. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from facegen_dist.commands import NAMES
from facegen_dist.commands import is_main_rank as _is_main_rank
from facegen_dist.errors import FacegenError


def exit_process(code: int) -> int:
    """Return `code`; in a process a distributed launcher started, end it here instead, without Python's teardown.

    Why: facegen_dist.cluster.teardown.end_without_teardown (gloo's threads can abort a finished run).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # imported only here: its logging and typing imports are a fifth of `facegen data --help`'s start-up
        from facegen_dist.cluster.teardown import end_without_teardown

        end_without_teardown(code)
    return code


def _fail(message: str) -> int:
    if _is_main_rank():
        print(f"facegen: error: {message}", file=sys.stderr)
    return 2


# What gloo and NCCL say when a process of the group died (its node lost, killed, out of memory).
LOST_PEER_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "NCCL communicator was aborted",
    "Broken pipe",
)


def _lost_peer(error: RuntimeError) -> str | None:
    """One line for a collective that failed because another process is gone; None for any other error."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not any(marker in first_line for marker in LOST_PEER_MARKERS):
        return None
    # gloo: "[.../pair.cc:561] Connection closed by peer [host]:port."
    cause = first_line.split("] ", 1)[-1].split(". This is typically")[0]
    return (
        f"rank {os.environ.get('RANK', '0')}: another training process is gone ({cause}); "
        "the newest checkpoint is intact: run the same command to resume from it"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facegen-dist")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        import facegen_dist

        return getattr(facegen_dist, "__version__", "unknown")


class _VersionAction(argparse.Action):
    """argparse's "version" action, with the version looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"facegen {_version()}")
        parser.exit()


def _command(name: str):
    return importlib.import_module(f"facegen_dist.commands.{name}")


def build_parser(names: tuple[str, ...] = NAMES) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `facegen` parser with the commands `names`, and each command's own parser by name."""
    parser = argparse.ArgumentParser(
        prog="facegen",
        description="Train, evaluate and study face/avatar generators, on one machine or a SLURM cluster.",
    )
    parser.add_argument("--version", action=_VersionAction, help="show the installed version and exit")
    # dest stays unset: `command` is taken by `facegen data`'s own subcommand and by `facegen launch -- ...`
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    commands = {}
    for name in names:
        commands[name] = _command(name).build_parser(subparsers)
        commands[name].set_defaults(facegen_command=name)
    return parser, commands


def _parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    # A command named first is the only one imported and built; the full list is for help and mistakes.
    parser, commands = build_parser((argv[0],) if argv[0] in NAMES else NAMES)
    args, unknown = parser.parse_known_args(argv)
    name = args.facegen_command
    if argv[0] != name:  # `facegen` itself takes no option but -h and --version, which exit
        parser.error(f"unrecognized arguments: {' '.join(argv[: argv.index(name)])}")
    if getattr(_command(name), "INTERMIXED", False):
        return name, commands[name].parse_intermixed_args(argv[1:])
    if unknown:  # said by the command's parser, as when each command parsed its own arguments
        commands[name].error(f"unrecognized arguments: {' '.join(unknown)}")
    return name, args


def _run(name: str, args: argparse.Namespace) -> int:
    try:
        return _command(name).run(args)
    except FacegenError as error:
        return _fail(str(error))
    except RuntimeError as error:
        # Only training has a checkpoint to resume from; another command's lost peer keeps its traceback.
        message = _lost_peer(error) if name == "train" else None
        if message is None:
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node: rank 0 may be the one that is gone
            print(f"facegen: error: {message}", file=sys.stderr, flush=True)
        return 2


ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dri", "/dev/accel")


def _quiet_deepspeed_on_cpu() -> None:
    """accelerate imports DeepSpeed, which warns "Setting accelerator to CPU" on every start of a machine without
    an NVIDIA GPU, into the middle of the progress output; naming the CPU accelerator up front is what it asks for."""
    # No device node of any accelerator DeepSpeed detects (NVIDIA, ROCm, Intel, Habana): then it would pick the CPU.
    if "DS_ACCELERATOR" not in os.environ and not any(map(os.path.exists, ACCELERATOR_DEVICES)):
        os.environ["DS_ACCELERATOR"] = "cpu"  # inherited by every process accelerate launch starts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _quiet_deepspeed_on_cpu()
    if not argv:
        build_parser()[0].print_help(sys.stderr)
        return 2
    return exit_process(_run(*_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
