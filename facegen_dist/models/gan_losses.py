"""GAN losses for the VQ-GAN, after taming-transformers.

From CompVis/taming-transformers `taming/modules/losses/vqperceptual.py`: hinge_d_loss, vanilla_d_loss,
calculate_adaptive_weight (here `adaptive_generator_weight`) and adopt_weight (here `disc_factor`).
Design notes (what is changed from taming, and why): docs/vqgan.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def score_real_and_fake(discriminator, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D's fp32 logits for a real and a fake batch, in separate forwards (as in the DCGAN and taming code).

    With BatchNorm, D must normalise the fakes over a fake-only batch here, as it does when the
    generator's phase scores them; one concatenated real+fake batch gave a VQ-GAN's G D(x_rec)
    ~ +0.3 where D's own phase scored the same images ~ -3.2.
    """
    return discriminator(real).float(), discriminator(fake.to(real.dtype)).float()


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in D_LOSSES:
        raise ValueError(f"GAN loss '{kind}' is not one of {', '.join(D_LOSSES)}")
    return D_LOSSES[kind](logits_real, logits_fake)


def generator_adversarial_loss(logits_fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's side of `kind` ('hinge' or 'vanilla')."""
    if kind == "hinge":
        return -logits_fake.mean()
    if kind == "vanilla":
        return F.softplus(-logits_fake).mean()
    raise ValueError(f"GAN loss '{kind}' is not one of {', '.join(D_LOSSES)}")


def feature_matching_loss(real_features: list[torch.Tensor], fake_features: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of L1(fake, real); the real features are detached (only G learns from this)."""
    if len(real_features) != len(fake_features) or not real_features:
        raise ValueError(f"feature lists differ or are empty: {len(real_features)} real, {len(fake_features)} fake")
    return torch.stack([F.l1_loss(fake, real.detach()) for real, fake in zip(real_features, fake_features)]).mean()


def disc_factor(images_seen: int, disc_start_images: int, factor: float = 1.0) -> float:
    """0 before the discriminator starts (`images_seen < disc_start_images`), `factor` from then on."""
    return factor if images_seen >= disc_start_images else 0.0


class AdaptiveWeight(NamedTuple):
    weight: torch.Tensor  # detached scalar, finite, in [0, max_weight]
    reason: str | None  # why the weight was forced to 0, for the log; None when it is the ratio


def adaptive_generator_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4, eps: float = 1e-4
) -> AdaptiveWeight:
    """||d nll / d last_layer|| / (||d g_loss / d last_layer|| + eps), clamped to [0, max_weight], detached.

    Balances the adversarial term against the reconstruction terms (Esser et al. 2021, eq. 7).
    The graph is kept (retain_graph) for the caller's backward. Under DDP these are this rank's
    gradients: the weight may differ between ranks (parameters still agree, DDP averages the final
    gradients); all-reduce it if one value is wanted. One host sync (to decide the reason).
    """
    zero = torch.zeros((), device=last_layer.device)
    if not (nll_loss.requires_grad and g_loss.requires_grad and torch.is_grad_enabled()):
        return AdaptiveWeight(zero, "no graph (evaluation or no_grad)")
    nll_grad, g_grad = (
        torch.autograd.grad(loss, last_layer, retain_graph=True, allow_unused=True)[0] for loss in (nll_loss, g_loss)
    )
    norms = torch.stack([grad.detach().float().norm() if grad is not None else zero for grad in (nll_grad, g_grad)])
    nll_norm, g_norm = norms.tolist()
    if not (math.isfinite(nll_norm) and math.isfinite(g_norm)):
        return AdaptiveWeight(zero, f"non-finite gradient norm (nll {nll_norm}, generator {g_norm})")
    if g_norm == 0.0:
        return AdaptiveWeight(zero, "generator gradient at the last layer is zero")
    weight = (norms[0] / (norms[1] + eps)).clamp(0.0, max_weight).detach()
    return AdaptiveWeight(weight, None)
