"""The metric registry: what each metric needs, and how it turns gathered features into numbers.

Feature metrics call torch-fidelity's own feature-level functions (the same code its `calculate_metrics` runs),
so values match torch-fidelity's for the same features. With an extractor other than Inception the names say so
(`fd_<extractor>`, not `fid`): an FD on another network is not comparable with published FIDs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from facegen_dist.eval.extractors import INCEPTION


@dataclass(frozen=True)
class MetricSpec:
    name: str
    needs: str  # "samples": generated images vs reference; "reconstructions": val images vs their reconstructions
    description: str


METRICS = {
    "fid": MetricSpec("fid", "samples", "Frechet distance of generated vs reference features"),
    "kid": MetricSpec("kid", "samples", "kernel (MMD) distance of generated vs reference features"),
    "prc": MetricSpec("prc", "samples", "precision/recall of generated vs reference features (k=3)"),
    "isc": MetricSpec("isc", "samples", "Inception score of generated images (needs class logits)"),
    "rfid": MetricSpec("rfid", "reconstructions", "Frechet distance of reconstructions vs their inputs"),
    "psnr": MetricSpec("psnr", "reconstructions", "PSNR of reconstructions (dB, pixels in [0, 1])"),
    "ssim": MetricSpec("ssim", "reconstructions", "SSIM of reconstructions (11x11 Gaussian window)"),
    "sharpness": MetricSpec(
        "sharpness",
        "reconstructions",
        "fine detail of reconstructions relative to their inputs (Laplacian energy; 1 = as much as the data)",
    ),
}


def value_names(metric: str, extractor: str) -> dict[str, str]:
    """torch-fidelity's result keys -> the names we report, which carry the extractor when it is not Inception."""
    # "avatar-v1" reports as fd_avatar (the version is in the protocol); other names as they are.
    tag = "" if extractor == INCEPTION else "_" + re.sub(r"-v\d+$", "", extractor)
    fd = "fid" if not tag else f"fd{tag}"
    return {
        "fid": {"frechet_inception_distance": fd},
        "rfid": {"frechet_inception_distance": f"r{fd}"},
        "kid": {"kernel_inception_distance_mean": f"kid{tag}", "kernel_inception_distance_std": f"kid{tag}_std"},
        "prc": {"precision": f"precision{tag}", "recall": f"recall{tag}", "f_score": f"f_score{tag}"},
        "isc": {"inception_score_mean": f"isc{tag}", "inception_score_std": f"isc{tag}_std"},
    }.get(metric, {metric: metric})


def feature_statistics(features: torch.Tensor) -> dict:
    return fid_features_to_statistics(features.double())


def compute_feature_metric(
    metric: str, generated: torch.Tensor, reference: torch.Tensor | None, reference_stats: dict | None, seed: int
) -> dict[str, float]:
    """torch-fidelity's result dict for one feature metric (generated first, real second, as it expects)."""
    if metric in ("fid", "rfid"):
        return fid_statistics_to_metric(feature_statistics(generated), reference_stats, verbose=False)
    if metric == "kid":
        subset = min(1000, generated.shape[0], reference.shape[0])
        return kid_features_to_metric(
            generated,
            reference,
            kid_subsets=100,
            kid_subset_size=subset,
            kid_degree=3,
            kid_gamma=None,
            kid_coef0=1,
            kid_kernel="poly",
            rng_seed=seed,
            verbose=False,
        )
    if metric == "prc":
        return prc_features_to_metric(
            generated, reference, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True, verbose=False
        )
    if metric == "isc":
        return isc_features_to_metric(generated, splits=10, shuffle=True, rng_seed=seed)
    raise KeyError(metric)


def psnr(reconstructions: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]."""
    mse = (reconstructions.float() - inputs.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def laplacian_energy(images: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared 3x3 Laplacian of the luma (pixels in [0, 1]): the energy of the finest detail.

    `sharpness` is its ratio, reconstructions over inputs, summed over the set (an almost flat image
    would make a per-image ratio explode). A blurred reconstruction scores below 1; noise or
    adversarial artefacts push it up as well, so read it beside PSNR/SSIM and the grids, never alone.
    """
    luma = (images.float() * torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)).sum(
        1, keepdim=True
    )
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=images.device).view(1, 1, 3, 3)
    return F.conv2d(luma, kernel).pow(2).flatten(1).mean(1)  # 'valid': no border response


def sharpness(reconstruction_energy: torch.Tensor, input_energy: torch.Tensor) -> float:
    return float(reconstruction_energy.double().sum() / input_energy.double().sum().clamp_min(1e-12))


def ssim(reconstructions: torch.Tensor, inputs: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004), Gaussian window, per channel then averaged; images in [0, 1].

    Written here (20 lines) rather than adding torchmetrics as a dependency for one function;
    checked equal (to 1e-7) to skimage's structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1).
    """
    # Centred at 0.5: E[x^2] - mu^2 on raw pixels cancels badly in float32 next to c2 = 9e-4;
    # centring keeps float32 exact to ~1e-7 (and fast; float64 convs are ~20x slower on CPU).
    x, y = reconstructions.float() - 0.5, inputs.float() - 0.5
    channels = x.shape[1]
    coords = torch.arange(window, dtype=torch.float32, device=x.device) - window // 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    rows = g.view(1, 1, 1, window).expand(channels, 1, 1, window).contiguous()
    columns = g.view(1, 1, window, 1).expand(channels, 1, window, 1).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        # The Gaussian is separable: two 1-D passes (22 taps) instead of one 11x11 (121).
        # 'valid': no padding artefacts at the borders.
        return F.conv2d(F.conv2d(t, rows, groups=channels), columns, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.pow(2)
    var_y = blur(y * y) - mu_y.pow(2)
    cov = blur(x * y) - mu_x * mu_y
    mu_x, mu_y = mu_x + 0.5, mu_y + 0.5  # back to pixel means for the luminance term
    c1, c2 = 0.01**2, 0.03**2
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return score.flatten(1).mean(1)
