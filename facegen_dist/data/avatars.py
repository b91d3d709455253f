"""Procedural cartoon avatars: the embedded dataset, a stand-in for Google Cartoon Set.

python-avatars composes avataaars-style SVGs from named parts (hair, eyes, mouth, skin, clothes, ...) and
resvg-py rasterises them, so every image comes with its attributes, like Cartoon Set's per-image CSV.
"""

from __future__ import annotations

import enum
import io
import random

import python_avatars as pa
import resvg_py
from PIL import Image

# python-avatars offers three backgrounds; a wider palette gives the models (and the
# attribute classifiers to come) a colour attribute with more than a few values.
BACKGROUNDS = {
    "sky": (101, 201, 255),
    "mint": (155, 225, 190),
    "peach": (255, 200, 160),
    "lavender": (200, 180, 240),
    "lemon": (250, 235, 140),
    "rose": (245, 165, 180),
    "slate": (90, 105, 125),
    "cream": (245, 240, 225),
}

# The avatar SVGs are 264 x 280 (w x h).
_SVG_ASPECT = 264 / 280


def _attribute_value(value) -> str:
    if isinstance(value, enum.Enum):
        return value.name.lower()
    return str(value).lower()


def _color_name(value, palette: type[enum.Enum]) -> str:
    if isinstance(value, enum.Enum):
        return value.name.lower()
    for member in palette:
        if member.value.lower() == str(value).lower():
            return member.name.lower()
    return str(value).lower()


def render_avatar(seed: int, index: int, size: int) -> tuple[bytes, dict[str, str]]:
    """Image `index` of the set made with `seed`: PNG bytes (size x size RGB) and attributes."""
    # Both packages draw from the global `random`: reseeded per image, image i is the same whatever
    # process or order renders it.
    random.seed(f"facegen-avatars/{seed}/{index}")
    background = random.choice(sorted(BACKGROUNDS))
    avatar = pa.Avatar.random(style=pa.AvatarStyle.TRANSPARENT, shirt_text="")
    attributes = {
        "top": _attribute_value(avatar.top),
        "hair_color": _color_name(avatar.hair_color, pa.HairColor),
        "hat_color": _color_name(avatar.hat_color, pa.ClothingColor),
        "eyebrows": _attribute_value(avatar.eyebrows),
        "eyes": _attribute_value(avatar.eyes),
        "mouth": _attribute_value(avatar.mouth),
        "facial_hair": _attribute_value(avatar.facial_hair) or "none",
        "facial_hair_color": _color_name(avatar.facial_hair_color, pa.HairColor),
        "skin_color": _color_name(avatar.skin_color, pa.SkinColor),
        "accessory": _attribute_value(avatar.accessory) or "none",
        "clothing": _attribute_value(avatar.clothing),
        "clothing_color": _color_name(avatar.clothing_color, pa.ClothingColor),
        "background": background,
    }
    width = max(1, round(size * _SVG_ASPECT))
    rgba = Image.open(io.BytesIO(bytes(resvg_py.svg_to_bytes(svg_string=avatar.render(), width=width, height=size))))
    canvas = Image.new("RGB", (size, size), BACKGROUNDS[background])
    canvas.paste(rgba, ((size - rgba.width) // 2, (size - rgba.height) // 2), rgba.convert("RGBA"))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue(), attributes


def attribute_vocabulary() -> dict[str, list[str]]:
    """Every value each attribute can take, for manifests and classifiers."""

    def names(members) -> list[str]:
        return sorted({m.name.lower() for m in members})

    return {
        "top": names(pa.TopType.get_all()),
        "hair_color": names(pa.HairColor),
        "hat_color": names(pa.ClothingColor),
        "eyebrows": names(pa.EyebrowType),
        "eyes": names(pa.EyeType),
        "mouth": names(pa.MouthType),
        "facial_hair": sorted(set(names(pa.FacialHairType)) | {"none"}),
        "facial_hair_color": names(pa.HairColor),
        "skin_color": names(pa.SkinColor),
        "accessory": sorted(set(names(pa.AccessoryType)) | {"none"}),
        "clothing": names(pa.ClothingType),
        "clothing_color": names(pa.ClothingColor),
        "background": sorted(BACKGROUNDS),
    }


def applicable_attributes(attributes: dict[str, str]) -> set[str]:
    """Attributes visible in the image: a hat colour without a hat, or a beard colour without a beard, is not."""
    applicable = set(attributes)
    hats = {member.name.lower() for member in pa.HatType}
    if attributes.get("top") not in hats:
        applicable.discard("hat_color")
    if attributes.get("facial_hair", "none") == "none":
        applicable.discard("facial_hair_color")
    return applicable
