"""`facegen` command line: train, data. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from facegen_dist.cluster.teardown import end_without_teardown
from facegen_dist.errors import FacegenError


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def exit_process(code: int) -> int:
    """Return `code`; in a process a distributed launcher started, end it here instead, without Python's teardown.

    Why: facegen_dist.cluster.teardown.end_without_teardown (gloo's threads can abort a finished run).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
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


def train_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a model. Run it under `accelerate launch` for several GPUs/processes.",
        epilog="Example: accelerate launch train.py --config configs/vae_avatars64.yaml train.total_images=20000 run.name=x",
    )
    parser.add_argument("--config", action="append", default=[], help="YAML config file (repeatable; later files win)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.latent_dim=200")
    args = parser.parse_intermixed_args(argv)  # `k=v --config X k2=v2` as well as `--config X k=v k2=v2`
    try:
        # here, not above: the other commands (facegen data, report ...) need no torch or accelerate
        from facegen_dist.config import load_config
        from facegen_dist.train.loop import run

        result = run(load_config(args.config, args.overrides))
    except FacegenError as error:
        return _fail(str(error))
    except RuntimeError as error:
        message = _lost_peer(error)
        if message is None:
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node: rank 0 may be the one that is gone
            print(f"facegen: error: {message}", file=sys.stderr, flush=True)
        return 2
    if result.get("preempted") and _is_main_rank():
        from facegen_dist.cluster.slurm import after_preemption

        print(f"facegen: {after_preemption()}", file=sys.stderr, flush=True)
    return 0


def _delegate(module: str, function: str):
    """A subcommand living in `module` (imported on use, so `facegen data` does not load torch-fidelity)."""

    def run(argv: list[str]) -> int:
        try:
            return getattr(importlib.import_module(module), function)(argv)
        except FacegenError as error:
            return _fail(str(error))

    return run


eval_main = _delegate("facegen_dist.eval.cli", "eval_main")
extractor_main = _delegate("facegen_dist.eval.train_extractor", "extractor_main")
latent_main = _delegate("facegen_dist.analysis.cli", "latent_main")
sample_main = _delegate("facegen_dist.eval.sampling", "sample_main")
data_main = _delegate("facegen_dist.data.cli", "data_main")
codes_main = _delegate("facegen_dist.data.codes", "codes_main")
launch_main = _delegate("facegen_dist.cluster.slurm", "launch_main")
submit_main = _delegate("facegen_dist.cluster.submit", "submit_main")
report_main = _delegate("facegen_dist.analysis.report", "report_main")
suite_main = _delegate("facegen_dist.analysis.suite", "suite_main")


COMMANDS = {
    "train": train_main,
    "data": data_main,
    "eval": eval_main,
    "extractor": extractor_main,
    "latent": latent_main,
    "sample": sample_main,
    "codes": codes_main,
    "launch": launch_main,
    "submit": submit_main,
    "report": report_main,
    "suite": suite_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: facegen {train,submit,launch,data,codes,eval,sample,extractor,latent,report,suite} ...\n  train  train a model (same as train.py)\n  submit submit a training run to SLURM with submitit (or --local)\n  launch inside an sbatch script: srun facegen launch -- train ... (accelerate launch with SLURM's rendezvous)\n  data   make shards (avatars, ffhq, cartoonset, folder) or verify them\n  codes  encode a VQ run's images into code shards for its prior\n  eval   FID/KID/PR/rFID/PSNR/SSIM of a run, with protocol\n  sample samples of a trained run as a PNG grid (shards over processes)\n  extractor train  train the avatar feature extractor\n  latent latent-space study of runs: reconstruction, latent map, prior samples, interpolation, attribute vectors\n  report compare runs: cost, quality, codebooks, grids and curves (Markdown + HTML)\n  suite  train + evaluate + report a suite of runs on one image budget",
            file=sys.stderr,
        )
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    return exit_process(COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
