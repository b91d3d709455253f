"""The shipped avatar feature extractor, registered in torch-fidelity as `avatar-v1`.

An AttributeNet trained on the embedded avatars' attributes (`facegen extractor train`); its pooled features give
an FD/KID/precision-recall that measures what matters on avatars, offline. Its values are reported as fd_avatar-v1
etc., never as FID: they are not comparable with Inception FIDs. The weights are checked against their sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from facegen_dist.data.shards import file_sha256
from facegen_dist.errors import FacegenError
from facegen_dist.models.attribute_net import AttributeNet

VERSION = "v1"
NAME = f"avatar-{VERSION}"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_WEIGHTS = ASSETS / f"{NAME}.safetensors"


def manifest_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def load_attribute_net(weights: str | Path | None = None) -> tuple[AttributeNet, dict]:
    """The network and its manifest; a one-line FacegenError if either is missing, corrupt or mismatched."""
    weights = Path(weights) if weights else DEFAULT_WEIGHTS
    manifest_file = manifest_path(weights)
    if not weights.is_file() or not manifest_file.is_file():
        raise FacegenError(
            f"avatar extractor: missing {weights if not weights.is_file() else manifest_file}; train one with `facegen extractor train`"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as error:
        raise FacegenError(f"avatar extractor: {manifest_file} is not valid JSON ({error})") from None
    digest = file_sha256(weights)
    if digest != manifest.get("sha256"):
        raise FacegenError(
            f"avatar extractor: {weights} has sha256 {digest[:12]}..., its manifest says {str(manifest.get('sha256'))[:12]}... (corrupt or replaced file)"
        )
    architecture = manifest["architecture"]
    net = AttributeNet(
        {name: len(values) for name, values in architecture["heads"].items()},
        tuple(architecture["channels"]),
        architecture["input_size"],
    )
    try:
        net.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError, OSError) as error:
        raise FacegenError(f"avatar extractor: cannot load {weights} ({str(error).splitlines()[0]})") from None
    return net.eval(), manifest


class AvatarFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity interface: uint8 [N,3,H,W] in, (features,) out."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net, self.manifest = load_attribute_net(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return ("features",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric in ("fid", "kid", "prc"):
            return "features"
        raise KeyError(f"{NAME} has no {metric} layer")

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def forward(self, images):
        return (self.net.features(images),)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, AvatarFeatureExtractor)
