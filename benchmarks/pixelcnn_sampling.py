"""Seconds per image to sample a GatedPixelCNN prior: the fast sampler, and the naive raster loop.

    python benchmarks/pixelcnn_sampling.py                                  # fast sampling, 16x16, CPU
    python benchmarks/pixelcnn_sampling.py --compare-naive                  # + naive on an 8x8 grid, and the ratio
Method and results: benchmarks/RESULTS.md, "PixelCNN sampling speed"; both samplers must return the same codes.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
from timing import best_of

from facegen_dist.models.pixelcnn import GatedPixelCNN


def seconds_per_image(
    model: GatedPixelCNN, num: int, grid: int, cond_codes: int, fast: bool, device: torch.device, repeats: int = 1
) -> tuple[float, torch.Tensor]:
    """The best of `repeats` sample calls (on a shared machine the minimum is the least noisy), per image."""
    cond = None
    if cond_codes:
        side = grid // model.cond_scale
        cond = torch.randint(0, cond_codes, (num, side, side), generator=torch.Generator().manual_seed(1))
    best, codes = best_of(
        lambda: model.sample(num, grid, grid, cond, generator=torch.Generator().manual_seed(0), fast=fast),
        device,
        repeats,
    )
    return best / num, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--num-codes", type=int, default=512)
    parser.add_argument(
        "--cond-codes", type=int, default=0, help="> 0: condition on a grid/2 code grid (a VQ-VAE-2 bottom prior)"
    )
    parser.add_argument("--grid", type=int, default=16, help="side of the code grid for the fast sampler")
    parser.add_argument("--num", type=int, default=8, help="images per sample call (the batch)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    parser.add_argument(
        "--compare-naive", action="store_true", help="also time the naive loop (one full forward per position)"
    )
    parser.add_argument("--naive-grid", type=int, default=8, help="grid side for the naive comparison")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row; the fastest is reported")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = (
        GatedPixelCNN(args.num_codes, args.channels, args.layers, args.kernel, cond_codes=args.cond_codes)
        .to(device)
        .eval()
    )
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    print(f"{name}; torch {torch.__version__}; {datetime.date.today().isoformat()}")
    print(
        f"GatedPixelCNN: {args.num_codes} codes, {args.channels} channels, {args.layers} layers, kernel {args.kernel}, "
        f"cond_codes {args.cond_codes}; {args.num} images per call, best of {args.repeats} calls"
    )

    def timed(grid: int, fast: bool) -> tuple[float, torch.Tensor]:
        return seconds_per_image(model, args.num, grid, args.cond_codes, fast, device, args.repeats)

    seconds_per_image(model, args.num, 2, args.cond_codes, True, device)  # warm-up (allocator, kernels)
    fast, _ = timed(args.grid, True)
    table = [(args.grid, fast, None, None)]  # (grid, fast s/img, naive s/img, same codes)
    if args.compare_naive:
        seconds_per_image(model, args.num, 2, args.cond_codes, False, device)
        fast, fast_codes = timed(args.naive_grid, True)
        naive, naive_codes = timed(args.naive_grid, False)
        row = (args.naive_grid, fast, naive, torch.equal(fast_codes, naive_codes))
        table = [row] if args.naive_grid == args.grid else [*table, row]

    print("| grid | fast s/img | naive s/img | naive / fast | same codes |")
    print("| --- | --- | --- | --- | --- |")
    for grid, fast, naive, same in table:
        if naive is None:
            print(f"| {grid}x{grid} | {fast:.4f} | - | - | - |")
        else:
            print(f"| {grid}x{grid} | {fast:.4f} | {naive:.4f} | {naive / fast:.1f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
