"""Read cost of the shard image formats: bytes per image, encode time, and decode+augment images/s per core.

    python benchmarks/data.py              # avatar + photo-like, 128/256/512 px, jpg/png/webp/webp-lossless
    python benchmarks/data.py --smoke      # 32 px, 4 images: seconds, for the tests
Method (what is timed, the photo-like stand-in, CPU time) and results: benchmarks/RESULTS.md, "Shard image formats".
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageFilter, features
from timing import cpu_model, git_commit

from facegen_dist.data.avatars import render_avatar
from facegen_dist.data.codecs import decode_image
from facegen_dist.data.convert import encode_image

FORMATS = ("jpg", "png", "webp", "webp-lossless")
CONTENTS = ("avatar", "photo-like")
GRAIN_BLUR_PX = 0.6


def photo_like(avatar: Image.Image, sigma: float, seed: int, index: int) -> Image.Image:
    """The avatar with seeded Gaussian pixel noise, blurred a little so the grain is correlated like a photo's."""
    pixels = np.asarray(avatar, dtype=np.float32)
    noise = np.random.default_rng([seed, 0x9A1, index]).normal(0.0, sigma, pixels.shape)
    noisy = Image.fromarray(np.clip(pixels + noise, 0, 255).round().astype(np.uint8))
    return noisy.filter(ImageFilter.GaussianBlur(GRAIN_BLUR_PX))


def render_images(num: int, size: int, seed: int, sigma: float) -> dict[str, list[Image.Image]]:
    """`num` avatars at `size` px, and their photo-like variants, by content."""
    avatars = [Image.open(io.BytesIO(render_avatar(seed, index, size)[0])).convert("RGB") for index in range(num)]
    return {
        "avatar": avatars,
        "photo-like": [photo_like(image, sigma, seed, index) for index, image in enumerate(avatars)],
    }


def encoder(fmt: str, jpg_quality: int, webp_quality: int):
    """A function image -> encoded bytes for `fmt`: the converter's own encoder (`facegen data ffhq|cartoonset|folder`)."""
    quality = {"jpg": jpg_quality, "webp": webp_quality}.get(fmt)
    return lambda image: encode_image(image, fmt, quality)


def cpu_seconds(work) -> float:
    """CPU time of this process running `work()`: time slices lost to other processes do not count."""
    start = time.process_time()
    work()
    return time.process_time() - start


def decode_augment(payloads: list[bytes], size: int, batch_size: int) -> None:
    """What the training stream does per sample after reading it (see ShardStream.__iter__ and _samples)."""
    for first in range(0, len(payloads), batch_size):
        images = []
        for index in range(first, min(first + batch_size, len(payloads))):
            image = decode_image(payloads[index], size)
            images.append(image[:, ::-1] if index % 2 else image)
        torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def measure_size(
    images: dict[str, list[Image.Image]], size: int, formats: list[str], args: argparse.Namespace
) -> list[dict]:
    """Rows for every (content, format) at one size; each time is the best of `args.repeats` passes."""
    cells = []
    for content in CONTENTS:
        for fmt in formats:
            encode = encoder(fmt, args.jpg_quality, args.webp_quality)
            payloads = [encode(image) for image in images[content]]  # also warms the codec up
            decode_augment(payloads[:1], size, args.batch_size)
            cells.append(
                {
                    "content": content,
                    "size": size,
                    "format": fmt,
                    "encode": encode,
                    "payloads": payloads,
                    "encode_s": math.inf,
                    "decode_s": math.inf,
                }
            )
    # Repeats go round all cells rather than back to back, so a burst of load from other
    # processes on a shared machine cannot spoil every pass of one cell.
    for _ in range(args.repeats):
        for cell in cells:
            cell["encode_s"] = min(
                cell["encode_s"], cpu_seconds(lambda: [cell["encode"](image) for image in images[cell["content"]]])
            )
            cell["decode_s"] = min(
                cell["decode_s"], cpu_seconds(lambda: decode_augment(cell["payloads"], size, args.batch_size))
            )
    return [
        {
            "content": cell["content"],
            "size": size,
            "format": cell["format"],
            "bytes_per_image": sum(map(len, cell["payloads"])) / len(cell["payloads"]),
            "encode_ms_per_image": 1e3 * cell["encode_s"] / len(cell["payloads"]),
            "decode_augment_images_per_s": len(cell["payloads"]) / cell["decode_s"],
        }
        for cell in cells
    ]


def jpeg_library() -> str:
    turbo = features.version("libjpeg_turbo")
    return f"libjpeg-turbo {turbo}" if turbo else f"libjpeg {features.version('jpg')}"


def header(args: argparse.Namespace, load_at_start: float) -> dict[str, str]:
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "cpu": f"{cpu_model()} ({platform.machine()}, {torch.get_num_threads()} torch thread)",
        "versions": f"torch {torch.__version__}, Pillow {PIL.__version__} ({jpeg_library()}, "
        f"libwebp {features.version('webp')}, zlib {features.version('zlib')}), Python {platform.python_version()}",
        # Other processes' load makes the figures slower than the cores can do: the reader should see it.
        "load": f"1-min load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, on {os.cpu_count()} cores",
        "command": shlex.join(["python", *sys.argv]),
        "settings": f"jpg quality {args.jpg_quality} 4:4:4, webp quality {args.webp_quality}, png default compression; "
        f"{args.num} images per cell, batch {args.batch_size}, best of {args.repeats}; photo-like noise sigma {args.noise_sigma}",
    }


def print_table(info: dict[str, str], rows: list[dict]) -> None:
    print(f"{info['date']}; commit {info['commit']}; {info['cpu']}; {info['versions']}")
    print(f"`{info['command']}` ({info['settings']}); {info['load']}")
    print()
    print("| content | size | format | bytes/img | encode ms/img | decode+augment img/s per core |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['content']} | {row['size']} | {row['format']} | {row['bytes_per_image']:,.0f} | "
            f"{row['encode_ms_per_image']:.2f} | {row['decode_augment_images_per_s']:,.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--num", type=int, default=48, help="images per (content, size, format) cell")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per cell; the fastest is reported")
    parser.add_argument("--batch-size", type=int, default=32, help="images stacked into one batch tensor")
    parser.add_argument("--jpg-quality", type=int, default=95)
    parser.add_argument("--webp-quality", type=int, default=90)
    parser.add_argument(
        "--noise-sigma", type=float, default=6.0, help="Gaussian pixel noise of the photo-like content (0-255 scale)"
    )
    parser.add_argument("--seed", type=int, default=0, help="avatar set and noise seed")
    parser.add_argument("--json", metavar="PATH", help="also write the header and rows as JSON")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests: --sizes 32 --num 4 --repeats 1")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.num, args.repeats = [32], 4, 1

    torch.set_num_threads(1)
    load_at_start = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        rows += measure_size(render_images(args.num, size, args.seed, args.noise_sigma), size, args.formats, args)
    rows.sort(key=lambda row: (CONTENTS.index(row["content"]), row["size"]))
    info = header(args, load_at_start)
    print_table(info, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
