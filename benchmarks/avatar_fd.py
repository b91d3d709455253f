"""Does fd_avatar measure something? Val vs train, then graded degradations of val.

    python benchmarks/avatar_fd.py --data data/avatars-64px-20000-seed0 [--num 2000]

Method and results: benchmarks/RESULTS.md, "Does fd_avatar measure something?".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF

from facegen_dist.data.pipeline import read_images
from facegen_dist.data.shards import split_shards
from facegen_dist.eval.avatar_extractor import load_attribute_net
from facegen_dist.eval.extractors import _cached_inception
from facegen_dist.eval.metrics import compute_feature_metric, feature_statistics


def features(net, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net.features(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def degrade(images: torch.Tensor, kind: str, level: float, generator: torch.Generator) -> torch.Tensor:
    x = images.float() / 255
    if kind == "blur":
        x = TF.gaussian_blur(x, kernel_size=2 * int(3 * level) + 1, sigma=level)
    elif kind == "noise":
        x = x + level * torch.randn(x.shape, generator=generator)
    elif kind == "hue":
        x = TF.adjust_hue(x, level)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/avatars-64px-20000-seed0")
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    net, manifest = load_attribute_net()
    generator = torch.Generator().manual_seed(0)

    train, _ = read_images(split_shards(args.data, "train"), args.num, args.resolution)
    val, val_attributes = read_images(split_shards(args.data, "val"), args.num, args.resolution)
    tick = time.perf_counter()
    reference = features(net, train)
    rate = train.shape[0] / (time.perf_counter() - tick)
    stats = feature_statistics(reference)

    def fd(images: torch.Tensor) -> float:
        return compute_feature_metric("fid", features(net, images), None, stats, seed=0)["frechet_inception_distance"]

    rows = [("val (no degradation)", "-", fd(val))]
    for kind, levels in (("blur", (0.5, 1.0, 2.0)), ("noise", (0.05, 0.1, 0.2)), ("hue", (0.05, 0.15, 0.3))):
        rows += [(kind, level, fd(degrade(val, kind, level, generator))) for level in levels]
    common = max(
        {a["hair_color"] for a in val_attributes}, key=lambda c: sum(a["hair_color"] == c for a in val_attributes)
    )
    one_colour = val[torch.tensor([a["hair_color"] == common for a in val_attributes])]
    # FD is biased upwards for small N: a random subset of the same size is the fair baseline.
    random_subset = val[torch.randperm(val.shape[0], generator=generator)[: one_colour.shape[0]]]
    rows.append(("random val subset (control for the next row)", f"n={random_subset.shape[0]}", fd(random_subset)))
    rows.append((f"attribute shift: hair_color={common} only", f"n={one_colour.shape[0]}", fd(one_colour)))

    inception = (
        "available" if _cached_inception().is_file() else "not on this machine (offline): Inception column omitted"
    )
    print(
        f"extractor {manifest['name']} (sha256 {manifest['sha256'][:12]}, feature dim {manifest['feature_dim']}); "
        f"reference: first {reference.shape[0]} train images; Inception weights: {inception}"
    )
    print("| degradation of val | level | fd_avatar |\n| --- | --- | --- |")
    for name, level, value in rows:
        print(f"| {name} | {level} | {value:.3f} |")
    print(
        f"\nfeature extraction: {rate:.0f} img/s on {torch.get_num_threads()} CPU threads -> 10k images in {10_000 / rate:.0f} s"
    )
    Path("avatar_fd_results.json").write_text(json.dumps({"rows": rows, "img_per_s": rate}, indent=2))


if __name__ == "__main__":
    main()
