"""`facegen extractor train`: train the avatar feature extractor on a shard set's attributes (Accelerate, DDP-ready)."""

from __future__ import annotations

from pathlib import Path

HELP = "train the avatar feature extractor: facegen extractor train ..."


def build_parser(subparsers):
    parser = subparsers.add_parser("extractor", help=HELP, description="Train the avatar attribute feature extractor.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train on a shard set's attribute JSON; writes OUT.safetensors + OUT.json")
    train.add_argument("--data", required=True, help="shard folder with a manifest listing attributes")
    train.add_argument(
        "--out",
        required=True,
        help="output path without extension, e.g. runs/avatar-extractor (writes .safetensors + .json)",
    )
    train.add_argument("--size", type=int, default=64, help="input size the network sees (images are resized)")
    train.add_argument("--images", type=int, default=80_000, help="training images in all")
    train.add_argument("--batch-size", type=int, default=64, help="per process")
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=1)
    return parser


def run(args) -> int:
    from facegen_dist.eval.train_extractor import train_extractor

    record = train_extractor(
        Path(args.data), Path(args.out), args.size, args.images, args.batch_size, args.lr, args.seed, args.workers
    )
    if record:
        accuracy = ", ".join(f"{name} {value:.3f}" for name, value in record["val_accuracy"].items())
        print(
            f"wrote {Path(args.out).with_suffix('.safetensors')} ({record['parameters']} parameters, feature dim {record['feature_dim']}); val accuracy: {accuracy}"
        )
    return 0
