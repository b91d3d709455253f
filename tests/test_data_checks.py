"""Data that lies is checked, not trusted: 16-bit images, decompression bombs, manifests that disagree with their shards."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from facegen_dist.data.codecs import decode_image
from facegen_dist.data.pipeline import ShardStream, StreamSpec
from facegen_dist.data.shards import split_shards, verify_shards
from facegen_dist.errors import DataError


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_png_keeps_its_grey_levels():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    decoded = decode_image(_png(Image.fromarray(ramp)), 64)
    expected = np.round(ramp / 257.0)
    assert np.abs(decoded[..., 0].astype(float) - expected).max() <= 1
    assert (decoded == 255).mean() < 0.01  # clipping sent 99.5 % of it to white before


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = _png(Image.new("1", (5000, 5000)))  # a few KB on disk, 25 M pixels
    with pytest.raises(DataError, match="too large for 64 px"):
        decode_image(bomb, 64)


def test_verify_counts_samples_and_wants_every_hash(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    assert verify_shards(shards) == []
    manifest = json.loads((shards / "manifest.json").read_text())
    first, second = manifest["splits"]["train"]["shards"][:2]
    first["num_samples"] += 7
    del second["sha256"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(shards)
    assert any(first["file"] in p and "the manifest says" in p for p in problems), problems
    assert any(second["file"] in p and "no sha256" in p for p in problems), problems


def test_a_bad_sample_is_reported_once_with_its_key_and_shard(tiny_shards, tmp_path, capsys):
    shard = split_shards(tiny_shards, "train")[0]
    stream = ShardStream(StreamSpec((shard,), 32, 8, seed=0))
    sample = {"__key__": "000123", "__url__": shard.path, "png": b"not a png"}
    assert stream._decode(sample) is None and stream._decode(sample) is None
    lines = [line for line in capsys.readouterr().err.splitlines() if "bad sample" in line]
    assert len(lines) == 1 and "000123" in lines[0] and shard.path in lines[0]
