"""`facegen report`: compare trained runs from their files (Markdown + HTML, figures, grids)."""

from __future__ import annotations

from pathlib import Path

from facegen_dist.errors import FacegenError

HELP = "compare runs: cost, quality, codebooks, grids and curves (Markdown + HTML)"


def build_parser(subparsers):
    parser = subparsers.add_parser(
        "report",
        help=HELP,
        description="Markdown + HTML comparison of trained runs, from their files.",
        epilog="Example: facegen report --runs runs/* --out report/",
    )
    parser.add_argument(
        "--runs",
        "--run",
        dest="runs",
        nargs="+",
        action="extend",
        required=True,
        help="run folders (each with config.yaml): --runs A B or --run A --run B (as facegen latent)",
    )
    parser.add_argument("--out", required=True, help="output folder for report.md, report.html and the figures")
    return parser


def run(args) -> int:
    from facegen_dist.analysis.report import build_report

    run_dirs = [Path(p) for p in args.runs if (Path(p) / "config.yaml").is_file()]
    if not run_dirs:
        raise FacegenError(f"--runs: none of {args.runs} is a run folder (with config.yaml)")
    path = build_report(run_dirs, Path(args.out))
    print(f"facegen report: {len(run_dirs)} run(s) -> {path} and {path.with_suffix('.html')}")
    return 0
