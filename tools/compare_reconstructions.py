"""Reconstructions of the same validation images by several runs, one row each, under the inputs.

    python tools/compare_reconstructions.py --run runs/vqvae2_avatars64 --run runs/vqgan_avatars64@ckpt-000000020000 --num 8 --zoom 2 --out docs/reconstructions_compared.png

Rows are labelled with run, images seen, PSNR and sharpness (also printed); `compare` says what the options pick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from facegen_dist.errors import ConfigError, FacegenError


def _split_run(spec: str) -> tuple[str, str]:
    run_dir, _, checkpoint = spec.partition("@")
    return run_dir, checkpoint


def compare(run_specs: list[str], num: int, zoom: int, out: Path) -> list[dict]:
    """The figure of `num` val images and each run's reconstructions at `out`; one record per run.

    `run_specs`: `DIR` or `DIR@CHECKPOINT` (default: the newest; EMA weights where the run keeps them). Each row
    is labelled with its run, images seen, and PSNR / sharpness over the images shown (the `facegen eval`
    definitions); `zoom` enlarges the pixels, so that blur and artefacts show. Runs must train at the same
    resolution on data with a val split.
    """
    from accelerate import PartialState
    from matplotlib.figure import Figure

    from facegen_dist.analysis.figures import _image_panel, _save
    from facegen_dist.data.codes import image_dir
    from facegen_dist.data.pipeline import read_images
    from facegen_dist.data.resolve import resolve_data_dir
    from facegen_dist.data.shards import split_shards
    from facegen_dist.eval.metrics import laplacian_energy, psnr, sharpness
    from facegen_dist.runs import restore_run

    state = PartialState(cpu=True)
    restored = [restore_run(run_dir, checkpoint_name=checkpoint) for run_dir, checkpoint in map(_split_run, run_specs)]
    resolutions = {run.cfg.data.resolution for run in restored}
    if len(resolutions) != 1:
        raise ConfigError(
            f"--run: the runs train at different resolutions ({', '.join(map(str, sorted(resolutions)))} px); compare runs of one resolution"
        )
    resolution = resolutions.pop()
    data_dir = image_dir(resolve_data_dir(restored[0].cfg.data, state))
    inputs = read_images(split_shards(data_dir, "val"), num, resolution)[0].float().div(255)
    if inputs.shape[0] == 0:
        raise FacegenError(f"{data_dir}: no val images to reconstruct")

    rows, labels, records = [inputs], ["input"], []
    for run in restored:
        with torch.no_grad():
            output = run.method.reconstruct(run.modules, inputs)
        if output is None:
            raise ConfigError(f"--run {run.run_dir}: a '{run.cfg.model.name}' run does not reconstruct images")
        output = output.float().clamp(0, 1)
        record = {
            "run": str(run.run_dir),
            "checkpoint": run.checkpoint.name,
            "images_seen": run.images_seen,
            "ema": run.ema,
            "psnr": float(psnr(output, inputs).mean()),
            "sharpness": sharpness(laplacian_energy(output), laplacian_energy(inputs)),
        }
        records.append(record)
        rows.append(output)
        labels.append(
            f"{run.run_dir.name}\n{run.images_seen:,} img\n{record['psnr']:.2f} dB\nsharp {record['sharpness']:.2f}"
        )

    cells = torch.stack(rows)  # [rows, num, 3, H, W]
    if zoom > 1:
        cells = cells.repeat_interleave(zoom, dim=-1).repeat_interleave(zoom, dim=-2)
    cell_inches = 0.8 * zoom
    figure = Figure(
        figsize=(cells.shape[1] * cell_inches + 2.0, cells.shape[0] * cell_inches + 0.8), layout="constrained"
    )
    _image_panel(
        figure.subplots(),
        cells,
        f"{inputs.shape[0]} val images (top) and each run's reconstruction; sharpness 1 = as much fine detail as the inputs",
        row_labels=labels,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(figure, out)
    return records


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description="Reconstructions of the same val images by several runs, side by side, with PSNR and sharpness."
    )
    parser.add_argument(
        "--run", action="append", required=True, help="run folder, optionally @checkpoint (repeat for each run)"
    )
    parser.add_argument("--num", type=int, default=8, help="val images (columns)")
    parser.add_argument("--zoom", type=int, default=2, help="pixel enlargement of every image")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if args.num < 1 or args.zoom < 1:
        print("compare_reconstructions: error: --num and --zoom must be >= 1", file=sys.stderr)
        return 2
    try:
        records = compare(args.run, args.num, args.zoom, Path(args.out))
    except FacegenError as error:
        print(f"compare_reconstructions: error: {error}", file=sys.stderr)
        return 2
    for record in records:
        print(
            f"{record['run']} {record['checkpoint']} ({record['images_seen']} images{', EMA' if record['ema'] else ''}): "
            f"PSNR {record['psnr']:.2f} dB, sharpness {record['sharpness']:.3f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
