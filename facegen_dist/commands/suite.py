"""`facegen suite`: train, evaluate and report every run of a suite file on one image budget."""

from __future__ import annotations

from pathlib import Path

from facegen_dist.errors import ConfigError

HELP = "train + evaluate + report a suite of runs on one image budget"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "suite",
        help=HELP,
        description="Train, evaluate and report a suite of runs with equal image budgets.",
        epilog="Example: facegen suite --suite configs/suite_avatars_smoke.yaml",
    )
    parser.add_argument(
        "--suite", required=True, help="suite YAML (configs/suite_avatars.yaml, configs/suite_avatars_smoke.yaml)"
    )
    parser.add_argument("--processes", type=int, default=0, help="processes per run (default: the suite's)")
    parser.add_argument("--only", default="", help="comma list of run names to do (default: all)")
    return parser


def run(args) -> int:
    from facegen_dist.analysis.report import build_report
    from facegen_dist.analysis.suite import load_suite, run_suite

    suite = load_suite(args.suite)
    processes = args.processes or int(suite.get("processes", 1))
    done = run_suite(suite, processes, {name for name in args.only.split(",") if name})
    if not done:
        raise ConfigError("facegen suite: no run finished; nothing to report")
    report = build_report(done, Path(suite["run_dir"]) / "report")
    print(f"facegen suite: report {report} and {report.with_suffix('.html')}")
    return 0
