"""How samples are stored in shards: an encoded image decoded for training, a code grid as .npy bytes.

The image stream (pipeline.py) and code shards (codes.py) both read these.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from facegen_dist.errors import DataError

MAX_SOURCE_PIXELS = 4096 * 4096  # and at least 64x the target's pixels (FFHQ's 1024 px for 128 px training)


def decode_image(payload: bytes, resolution: int) -> np.ndarray:
    """Encoded image -> uint8 HWC RGB, centre-cropped to a square and resized (Lanczos) to `resolution`."""
    with Image.open(io.BytesIO(payload)) as image:
        # Refuse decompression bombs before decoding: the header gives the size for free.
        if image.width * image.height > max(64 * resolution * resolution, MAX_SOURCE_PIXELS):
            raise DataError(f"{image.width}x{image.height} image is too large for {resolution} px training")
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey: convert("RGB") would clip at 255
            scale = 257.0 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 1.0
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / scale).round().clip(0, 255).astype(np.uint8))
        image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        if width != height:
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        if side != resolution:
            image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.uint8)


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(payload: bytes) -> np.ndarray:
    return np.load(io.BytesIO(payload), allow_pickle=False)
