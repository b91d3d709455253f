"""Feature extractors for FID/KID/PR: torch-fidelity's registry, with weights that are never random.

The standard network is torch-fidelity's `inception-v3-compat` (the TF-FID Inception), its weights found by
`inception_weights_path`: a randomly initialised Inception gives numbers that look like FIDs and mean nothing.
Other extractors (tests' tiny one, the avatar extractor) are registered by modules named in `eval.plugins`.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from facegen_dist.errors import ConfigError, FacegenError
from facegen_dist.eval import avatar_extractor  # noqa: F401 — registers avatar-v1 with torch-fidelity

INCEPTION = "inception-v3-compat"
# torch-fidelity's release asset (utils/util_convert_inception_weights.py of torch-fidelity made it).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]

# Which torch-fidelity metric's default layer each of our metrics uses.
LAYER_OF_METRIC = {"fid": "fid", "kid": "kid", "prc": "prc", "rfid": "fid", "isc": "isc"}


@dataclass
class Extractor:
    name: str
    network: torch.nn.Module
    layers: dict[str, str]  # our metric name -> feature layer
    weights_sha256: str

    @property
    def feature_names(self) -> list[str]:
        return sorted(set(self.layers.values()))

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.network(images_uint8)
        named = self.network.convert_features_tuple_to_dict(features if isinstance(features, tuple) else (features,))
        return {name: value.detach().float().cpu() for name, value in named.items()}


def load_plugins(modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"eval.plugins: cannot import '{module}' ({error})") from None


def state_dict_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _cached_inception() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_extractor_name(eval_cfg, dataset_name: str | None) -> str:
    """`auto` and `avatar` -> a registered name (see EvalConfig.extractor)."""
    from facegen_dist.eval.avatar_extractor import NAME as AVATAR

    name = eval_cfg.extractor
    if name == "avatar":
        return AVATAR
    if name != "auto":
        return name
    if eval_cfg.inception_weights or _cached_inception().is_file():
        return INCEPTION
    return AVATAR if dataset_name == "avatars" else INCEPTION


def inception_weights_path(eval_cfg) -> str:
    """A local file with the Inception weights: `eval.inception_weights`, else torch's hub cache (where
    torch-fidelity downloads them), else a download if `eval.allow_download`; else a one-line error."""
    if eval_cfg.inception_weights:
        if not os.path.isfile(eval_cfg.inception_weights):
            raise ConfigError(f"eval.inception_weights: no such file '{eval_cfg.inception_weights}'")
        return eval_cfg.inception_weights
    cached = _cached_inception()
    if cached.is_file():
        return str(cached)
    how = f"download {INCEPTION_URL} on a machine with internet and pass eval.inception_weights=PATH (or put it in {cached.parent})"
    if not eval_cfg.allow_download:
        raise FacegenError(f"eval: no Inception weights for {INCEPTION} and downloads are off; {how}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=True)
    except Exception as error:  # noqa: BLE001 — URLError, timeouts, HTTP errors: all mean "no weights"
        raise FacegenError(f"eval: could not download the Inception weights ({type(error).__name__}); {how}") from None
    return str(cached)


def build_extractor(eval_cfg, metrics: list[str], device: torch.device, dataset_name: str | None = None) -> Extractor:
    load_plugins(list(eval_cfg.plugins))
    name = resolve_extractor_name(eval_cfg, dataset_name)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ConfigError(
            f"eval.extractor: '{name}' is not registered; known: {sorted(FEATURE_EXTRACTORS_REGISTRY)} (add a module to eval.plugins to register more)"
        )
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    layers = {}
    for metric in metrics:
        if metric in LAYER_OF_METRIC:
            try:
                layers[metric] = cls.get_default_feature_layer_for_metric(LAYER_OF_METRIC[metric])
            except Exception:  # noqa: BLE001 — extractors without e.g. logits cannot do ISC
                raise ConfigError(f"eval.metrics: extractor '{name}' cannot compute '{metric}'") from None
    kwargs = {"verbose": False}
    if name == INCEPTION:
        kwargs["feature_extractor_weights_path"] = inception_weights_path(eval_cfg)
    elif eval_cfg.extractor_weights:
        kwargs["feature_extractor_weights_path"] = eval_cfg.extractor_weights
    network = cls(name, sorted(set(layers.values())) or list(cls.get_provided_features_list())[:1], **kwargs)
    network.eval().requires_grad_(False).to(device)
    # A shipped extractor is named by its file's sha256 (as in its manifest); others by their tensors.
    digest = getattr(network, "manifest", {}).get("sha256") or state_dict_sha256(network)
    return Extractor(name=name, network=network, layers=layers, weights_sha256=digest)
