"""Weight files behind the perceptual losses, found and read here so that models/ reads no files.

VGG16 (LPIPS) trunk, in order: the `weights` path (a torchvision vgg16 state dict), torch hub's cache
(`<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth`), or a download, allowed by default as Inception's is
(refused with FACEGEN_ALLOW_DOWNLOAD=0); without weights a one-line ConfigError says what to pass.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from facegen_dist.errors import ConfigError
from facegen_dist.models.perceptual import AvatarLPIPS, PerceptualLoss, TinyLPIPS

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights, the ones LPIPS was calibrated on
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
VGG16_HASH_PREFIX = "397923af"  # the sha256 prefix in the file name, checked after a download
ALLOW_DOWNLOAD_ENV = "FACEGEN_ALLOW_DOWNLOAD"
BACKBONES = ("vgg16", "avatar", "tiny")


def _allowed_online(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "1").lower() not in ("0", "false", "no")


def vgg16_weights_path(weights: str = "", allow_download: bool | None = None) -> Path:
    """Where the VGG16 trunk comes from: `weights`, else torch hub's cache, else a permitted download."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.perceptual_weights: no file '{weights}'")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if cached.is_file():
        return cached
    how = f"pass model.perceptual_weights=/path/to/{VGG16_FILE} (from {VGG16_URL}) or put it at {cached}"
    if not _allowed_online(allow_download):
        raise ConfigError(
            f"model.perceptual_weights: no VGG16 weights given and none at {cached}, and downloads are off "
            f"({ALLOW_DOWNLOAD_ENV}=0); {how}"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(VGG16_URL, str(cached), hash_prefix=VGG16_HASH_PREFIX)
    except Exception as error:  # noqa: BLE001 — URLError, timeouts, HTTP errors, a bad hash: all mean "no weights"
        raise ConfigError(
            f"model.perceptual_weights: could not download VGG16 ({type(error).__name__}); {how}"
        ) from None
    return cached


def _read_vgg16_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"model.perceptual_weights: cannot read '{path}' ({type(error).__name__})") from error
    # The 13 convs of vgg16.features; LPIPS uses all of them.
    convs = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
    missing = [
        f"features.{index}.{name}"
        for index in convs
        for name in ("weight", "bias")
        if not isinstance(state, dict) or f"features.{index}.{name}" not in state
    ]
    if missing:
        raise ConfigError(f"model.perceptual_weights: '{path}' is not a torchvision vgg16 state dict (no {missing[0]})")
    return state


def _load_vgg16_trunk(trunk: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy torchvision's `features.N.*` tensors into lpips' slices (whose children keep the index N)."""
    for stage in trunk.children():
        for index, layer in stage.named_children():
            for name, param in layer.named_parameters(recurse=False):
                key = f"features.{index}.{name}"
                if state[key].shape != param.shape:
                    raise ConfigError(
                        f"model.perceptual_weights: '{path}' is not a torchvision vgg16 state dict "
                        f"({key} has shape {tuple(state[key].shape)})"
                    )
                param.data.copy_(state[key])


def _lpips_vgg16(weights: str, allow_download: bool | None) -> nn.Module:
    """The `lpips` package's LPIPS(net='vgg') with its v0.1 linear heads (shipped inside it: taming's heads)."""
    path = vgg16_weights_path(weights, allow_download)
    state = _read_vgg16_state(path)  # before the slow build: fail fast
    import lpips  # here, so 'tiny' needs neither lpips nor torchvision

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        # pretrained=True: the package's linear heads; pnet_rand=True: a random trunk, so no download.
        model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    _load_vgg16_trunk(model.net, state, path)
    return model


def perceptual_loss(backbone: str = "vgg16", weights: str = "", allow_download: bool | None = None) -> PerceptualLoss:
    """The frozen perceptual loss `backbone` names, its weights loaded.

    backbone: 'vgg16' (real LPIPS), 'avatar' (the shipped avatar network: avatars, offline) or 'tiny' (tests only).
    weights: a torchvision vgg16 state dict for 'vgg16' (see the module docstring for the search order);
    for 'avatar' another avatar extractor's .safetensors (default: the shipped one).
    allow_download: None reads FACEGEN_ALLOW_DOWNLOAD (default: the VGG16 trunk may be downloaded; 0 refuses).
    """
    if backbone == "vgg16":
        net = _lpips_vgg16(weights, allow_download)
    elif backbone == "avatar":
        from facegen_dist.eval.avatar_extractor import load_attribute_net  # here: it pulls in torch-fidelity

        net = AvatarLPIPS(load_attribute_net(weights or None)[0])
    elif backbone == "tiny":
        net = TinyLPIPS()
    else:
        raise ConfigError(f"model.perceptual: backbone '{backbone}' is not one of {', '.join(BACKBONES)}")
    return PerceptualLoss(net, backbone)
