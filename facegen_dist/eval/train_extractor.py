"""`facegen extractor train`: train the avatar AttributeNet on a shard set's attributes (Accelerate, DDP-ready).

A short supervised loop, not the generative Trainer: one cross-entropy per attribute head (labels that do not
apply to an image, e.g. a hat colour without a hat, are ignored), on the training's resumable shard stream with
labels. Deterministic for a seed on CPU. Writes `<out>.safetensors` and its manifest `<out>.json`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import save_file

from facegen_dist import __version__
from facegen_dist.accelerator import make_accelerator
from facegen_dist.data.pipeline import StreamSpec, attribute_labels, make_train_loader, read_images
from facegen_dist.data.shards import MANIFEST_NAME, file_sha256, read_manifest, split_shards
from facegen_dist.errors import FacegenError
from facegen_dist.log.progress import progress_bar
from facegen_dist.models.attribute_net import AttributeNet
from facegen_dist.schedule import lr_factor

CHANNELS = (32, 64, 128, 192)


@torch.no_grad()
def attribute_accuracy(
    net: AttributeNet, images: torch.Tensor, labels: torch.Tensor, names: list[str], batch_size: int = 256
) -> dict[str, float]:
    """Held-out accuracy per attribute, over the images where it applies."""
    net.eval()
    correct, counted = torch.zeros(len(names)), torch.zeros(len(names))
    for start in range(0, images.shape[0], batch_size):
        _, logits = net(images[start : start + batch_size])
        target = labels[start : start + batch_size]
        for index, name in enumerate(names):
            valid = target[:, index] >= 0
            correct[index] += (logits[name].argmax(1)[valid] == target[valid, index]).sum()
            counted[index] += valid.sum()
    return {name: float(correct[i] / counted[i]) if counted[i] else float("nan") for i, name in enumerate(names)}


def majority_baseline(labels: torch.Tensor, names: list[str]) -> dict[str, float]:
    baseline = {}
    for index, name in enumerate(names):
        column = labels[:, index][labels[:, index] >= 0]
        baseline[name] = float(column.bincount().max() / column.numel()) if column.numel() else float("nan")
    return baseline


def train_extractor(
    data_dir: Path, out: Path, size: int, total_images: int, batch_size: int, lr: float, seed: int, workers: int
) -> dict:
    """Train the attribute network on the shards' labels over every process; write out.safetensors + out.json."""
    accelerator = make_accelerator()
    manifest = read_manifest(data_dir)
    vocabulary = manifest.get("attributes") or {}
    if not vocabulary:
        raise FacegenError(
            f"{data_dir}: the manifest lists no attributes to learn (is this an avatar/Cartoon Set shard set?)"
        )
    names = sorted(vocabulary)
    attributes = tuple((name, tuple(vocabulary[name])) for name in names)
    set_seed(seed)
    net = AttributeNet({name: len(vocabulary[name]) for name in names}, CHANNELS, input_size=size).to(
        memory_format=torch.channels_last
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    net, optimizer = accelerator.prepare(net, optimizer)
    set_seed(seed, device_specific=True)
    spec = StreamSpec(
        tuple(split_shards(data_dir, "train")),
        size,
        batch_size,
        seed=seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        num_workers=workers,
        attributes=attributes,
    )
    batches = iter(make_train_loader(spec, pin_memory=accelerator.device.type == "cuda"))
    images_per_step = batch_size * accelerator.num_processes
    steps = math.ceil(total_images / images_per_step)
    started = time.perf_counter()
    _fit(accelerator, net, optimizer, batches, names, steps, images_per_step, total_images, lr)
    training = {
        "images": steps * images_per_step,
        "batch_size": batch_size,
        "processes": accelerator.num_processes,
        "lr": lr,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    record = {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(net).cpu()
        record = _write_extractor(model, out, data_dir, manifest, vocabulary, names, attributes, size, training)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return record


def _fit(accelerator, net, optimizer, batches, names, steps, images_per_step, total_images, lr) -> None:
    """Mean cross-entropy over the attribute heads (unlabelled values ignored), cosine lr after a 5 % warm-up."""
    bar = progress_bar(range(steps), desc="avatar extractor", unit="step", disable=not accelerator.is_main_process)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(step * images_per_step, total_images, total_images // 20, "cosine", 0.01)
        batch = next(batches)
        images, labels = batch["image"].to(accelerator.device), batch["labels"].to(accelerator.device)
        _, logits = net(images)
        loss = sum(F.cross_entropy(logits[name], labels[:, i], ignore_index=-1) for i, name in enumerate(names)) / len(
            names
        )
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)


def _write_extractor(model, out, data_dir, manifest, vocabulary, names, attributes, size, training) -> dict:
    """The weights (atomically, 0644) and their manifest: architecture, data, training, held-out accuracy, sha256."""
    val_images, val_attributes = read_images(split_shards(data_dir, "val"), 10**9, size)
    val_labels = torch.from_numpy(np.stack([attribute_labels(a, attributes) for a in val_attributes]))
    accuracy = attribute_accuracy(model, val_images, val_labels, names)
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = out.with_suffix(".safetensors")
    tmp = weights.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.chmod(tmp, 0o644)  # ships inside the package: readable by every user
    os.replace(tmp, weights)
    record = {
        "name": out.stem,
        "architecture": {
            "class": "AttributeNet",
            "channels": list(CHANNELS),
            "input_size": size,
            "heads": {n: list(vocabulary[n]) for n in names},
        },
        "feature_dim": CHANNELS[-1],
        "feature": "global average pool of the last conv stage",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dataset": {
            "name": manifest.get("name"),
            "manifest_sha256": file_sha256(Path(data_dir) / MANIFEST_NAME),
            "image_size": manifest.get("image_size"),
            "seed": manifest.get("seed"),
            "train_samples": manifest["splits"]["train"]["num_samples"],
            "val_samples": int(val_images.shape[0]),
        },
        "training": training,
        "val_accuracy": accuracy,
        "val_majority_baseline": majority_baseline(val_labels, names),
        "tool": f"facegen-dist {__version__}",
        "sha256": file_sha256(weights),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record
