"""Seconds per image to sample a CodeGPT prior: with the KV cache, and recomputing the full prefix each step.

    python benchmarks/gpt_sampling.py                                   # 16x16 codes, CPU
    python benchmarks/gpt_sampling.py --grid 32 --layers 12 --embd 512 --heads 8 --num 32 --device cuda
Method and results: benchmarks/RESULTS.md, "GPT prior sampling"; both paths must return the same codes.
"""

from __future__ import annotations

import argparse
import datetime
import platform

import torch
from timing import best_of

from facegen_dist.models.gpt import CodeGPT


def seconds_per_image(
    model: CodeGPT, num: int, use_cache: bool, device: torch.device, repeats: int = 1
) -> tuple[float, torch.Tensor]:
    """The best of `repeats` sample calls (on a shared machine the minimum is the least noisy), per image."""
    cond = torch.arange(num) % model.num_classes if model.num_classes else None
    best, codes = best_of(
        lambda: model.sample(num, cond, generator=torch.Generator().manual_seed(0), use_cache=use_cache),
        device,
        repeats,
    )
    return best / num, codes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--num-codes", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=0, help="> 0: class-conditional prior")
    parser.add_argument("--grid", type=int, default=16, help="side of the code grid: seq_len = grid^2")
    parser.add_argument("--num", type=int, default=4, help="images per sample call (the batch)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--bf16", action="store_true", help="sample under bf16 autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path; the fastest is reported")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for tests: 2 layers, 32 wide, 16 codes, 4x4 grid, 2 images, 1 repeat",
    )
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.heads, args.embd, args.num_codes, args.grid, args.num, args.repeats = 2, 2, 32, 16, 4, 2, 1

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = (
        CodeGPT(args.num_codes, args.grid**2, args.layers, args.heads, args.embd, num_classes=args.num_classes)
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
        f"CodeGPT: {args.num_codes} codes, {args.grid}x{args.grid} grid, {args.layers} layers, {args.heads} heads, {args.embd} wide, "
        f"{model.num_params() / 1e6:.2f} M params, num_classes {args.num_classes}, {'bf16 autocast' if args.bf16 else 'fp32'}; "
        f"{args.num} images per call, best of {args.repeats} calls"
    )

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        seconds_per_image(model, args.num, True, device)  # warm-up (allocator, kernels)
        cached, cached_codes = seconds_per_image(model, args.num, True, device, args.repeats)
        uncached, uncached_codes = seconds_per_image(model, args.num, False, device, args.repeats)
    same = torch.equal(cached_codes, uncached_codes)

    print("| grid | cached s/img | uncached s/img | uncached / cached | same codes |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| {args.grid}x{args.grid} | {cached:.4f} | {uncached:.4f} | {uncached / cached:.1f}x | {'yes' if same else 'NO'} |"
    )


if __name__ == "__main__":
    main()
