"""LPIPS perceptual loss for the VQ-GAN, frozen, with weights that never download by surprise.

taming-transformers (`taming/modules/losses/lpips.py`) uses LPIPS over VGG16 (Zhang et al. 2018):
channel-normalised features at five depths, squared difference, learnt non-negative 1x1 heads,
spatial mean, sum over depths. Here 'vgg16' is the `lpips` package's LPIPS(net='vgg') with its
v0.1 linear heads (shipped inside the package) - the same heads taming downloads.

Changed from taming, and why:
- The VGG16 trunk is not fetched through torchvision at construction (impossible offline, and
  silent online). It is loaded from, in order: the `weights` path (a torchvision vgg16 state
  dict), torch hub's cache (`<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth`), or a
  download only when allowed (`allow_download=True` or FACEGEN_ALLOW_DOWNLOAD=1). Otherwise a
  one-line ConfigError says what to pass.
- Inputs are images in [0, 1] (scaled to [-1, 1] inside); the loss is per image, shape [B].
- 'tiny' is a fixed-seed random 3-level conv net with the same formula and unit heads: it runs
  in milliseconds for tests and CPU smoke configs and means nothing about image quality.
- The module stays in eval mode whatever its parent's mode (dropout in the heads stays off).

Keeping it out of checkpoints and optimizers: hold the PerceptualLoss as a plain attribute of the
Method, not in the modules dict the loop prepares, checkpoints and optimizes; move it with
`.to(device)`. It has no trainable parameters and its weights are rebuilt from files, so a
checkpoint needs none of its 58 MB (VGG16 trunk).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facegen_dist.errors import ConfigError

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 weights, the ones LPIPS was calibrated on
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
VGG16_HASH_PREFIX = "397923af"  # the sha256 prefix in the file name, checked after a download
ALLOW_DOWNLOAD_ENV = "FACEGEN_ALLOW_DOWNLOAD"
BACKBONES = ("vgg16", "avatar", "tiny")


class TinyLPIPS(nn.Module):
    """Plumbing-only stand-in: LPIPS formula over a fixed random conv net. Inputs in [-1, 1]."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), seed: int = 0):
        super().__init__()
        generator, stages, in_channels = torch.Generator().manual_seed(seed), [], 3
        for index, width in enumerate(widths):
            conv = nn.Conv2d(in_channels, width, 3, stride=1 if index == 0 else 2, padding=1)
            # Own generator: the same net whatever the global RNG state.
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * (2 / (in_channels * 9)) ** 0.5
            conv.bias.data.zero_()
            stages.append(nn.Sequential(conv, nn.ReLU()))
            in_channels = width
        self.stages = nn.ModuleList(stages)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return lpips_distance(self.stages, images, targets)


def lpips_distance(stages, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LPIPS with unit heads over the outputs of `stages` (applied in turn): per image [B]."""
    total = images.new_zeros(images.shape[0])
    for stage in stages:
        images, targets = stage(images), stage(targets)
        # F.normalize: unlike x / sqrt(sum x^2) it has a gradient where ReLU zeroed every channel.
        difference = (F.normalize(images, dim=1, eps=1e-10) - F.normalize(targets, dim=1, eps=1e-10)).pow(2)
        total = total + difference.sum(1).mean((1, 2))  # unit heads, spatial mean
    return total


class AvatarLPIPS(nn.Module):
    """LPIPS form over the four stages of the shipped avatar attribute network (avatar-v1), unit heads.

    A real, trained feature space for cartoon avatars that needs no download: the perceptual loss of
    the CPU avatar configs, where VGG16 weights are not to be had offline. Caveat: the avatar FD
    (`fd_avatar`, `rfd_avatar`) measures in the same feature space, so a model trained with this loss
    is favoured by that metric; judge it by PSNR/SSIM and by eye too. Inputs in [-1, 1].
    """

    def __init__(self, weights: str = ""):
        super().__init__()
        from facegen_dist.eval.avatar_extractor import load_attribute_net  # late: pulls in torch-fidelity

        net, _ = load_attribute_net(weights or None)
        self.input_size = net.input_size
        self.stages = net.trunk

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.input_size:
            images, targets = (
                F.interpolate(
                    x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True, align_corners=False
                )
                for x in (images, targets)
            )
        return lpips_distance(self.stages, images, targets)


def _allowed_online(allow_download: bool | None) -> bool:
    if allow_download is not None:
        return allow_download
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").lower() in ("1", "true", "yes")


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
    if not _allowed_online(allow_download):
        raise ConfigError(
            f"model.perceptual_weights: no VGG16 weights given and none at {cached}; pass "
            f"model.perceptual_weights=/path/to/{VGG16_FILE} or run once online with {ALLOW_DOWNLOAD_ENV}=1"
        )
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(VGG16_URL, str(cached), hash_prefix=VGG16_HASH_PREFIX)
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
    path = vgg16_weights_path(weights, allow_download)
    state = _read_vgg16_state(path)  # before the slow build: fail fast
    import lpips  # here, so 'tiny' needs neither lpips nor torchvision

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        # pretrained=True: the package's linear heads; pnet_rand=True: a random trunk, so no download.
        model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    _load_vgg16_trunk(model.net, state, path)
    return model


class PerceptualLoss(nn.Module):
    """Frozen LPIPS distance between images in [0, 1]; returns one value per image, shape [B].

    backbone: 'vgg16' (real LPIPS), 'avatar' (the shipped avatar network: avatars, offline) or 'tiny' (tests only).
    weights: a torchvision vgg16 state dict for 'vgg16' (see the module docstring for the search order);
    for 'avatar' another avatar extractor's .safetensors (default: the shipped one).
    allow_download: None reads FACEGEN_ALLOW_DOWNLOAD; only then may the VGG16 trunk be downloaded.
    """

    def __init__(self, backbone: str = "vgg16", weights: str = "", allow_download: bool | None = None):
        super().__init__()
        if backbone == "vgg16":
            self.net = _lpips_vgg16(weights, allow_download)
        elif backbone == "avatar":
            self.net = AvatarLPIPS(weights)
        elif backbone == "tiny":
            self.net = TinyLPIPS()
        else:
            raise ConfigError(f"model.perceptual: backbone '{backbone}' is not one of {', '.join(BACKBONES)}")
        self.backbone = backbone
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # always eval: a parent's .train() must not switch the heads' dropout on

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.net(images * 2 - 1, targets * 2 - 1).reshape(images.shape[0])

    def extra_repr(self) -> str:
        return f"backbone={self.backbone}"
