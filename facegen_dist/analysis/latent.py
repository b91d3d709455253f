"""The numbers of the latent-space study: encode a split over ranks, then project, measure and walk the latent.

A model enters through `Method.latent_model(modules)`: `encode(images) -> (mean, logvar or None)` and
`decode(latents)`. Latents are handled flattened ([N, D]) and reshaped only to decode, so a spatial
pre-quantisation latent works the same way. Figures are drawn in figures.py.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import torch

from facegen_dist.data.shards import ShardInfo, image_extension, iter_shard_samples
from facegen_dist.errors import ConfigError, DataError
from facegen_dist.eval.features import distributed_features
from facegen_dist.eval.metrics import psnr
from facegen_dist.eval.reference import split_chunk_reader
from facegen_dist.models.autoencoder import gaussian_kl

TSNE_MISSING = "t-SNE skipped: scikit-learn is not installed (pip install 'facegen-dist[analysis]')"
# Largest latent for a full-covariance Gaussian fit: its D x D float64 matrix and eigendecomposition take
# 134 MB and seconds at 4096 dims, but 3.4 GB and most of an hour for a 64 px VQ-VAE2's 20480.
MAX_FULL_FIT_DIMS = 4096


@dataclass(frozen=True)
class StudyOptions:
    attr: str
    attr_value: str | None = None  # None: the most common value other than "none"
    seed: int = 0
    show: int = 8  # val images in the reconstruction grid
    prior_samples: int = 64
    pairs: int = 4  # interpolation rows
    steps: int = 8  # interpolation columns, endpoints included
    faces: int = 4  # attribute-vector rows
    strengths: tuple[float, ...] = (-2.0, -1.0, 0.0, 1.0, 2.0)
    k: int = 5
    knn_test_fraction: float = 0.5


def read_split_attributes(shards: list[ShardInfo], num: int) -> list[dict]:
    """Attribute dicts of the first `num` images of a split, in the order the encoder sees them (JSON only, no decoding)."""
    attributes = []
    for shard in shards:
        for sample in iter_shard_samples(shard.path):
            if image_extension(sample) is None:
                continue
            attributes.append(json.loads(sample["json"]) if "json" in sample else {})
            if len(attributes) == num:
                return attributes
    raise DataError(f"split has {len(attributes)} images, fewer than the {num} asked for")


def encode_split(
    accelerator, model, data_dir, split: str, num: int, batch_size: int, resolution: int, description: str
) -> dict[str, torch.Tensor]:
    """Latent mean (and log-variance) with reconstruction MSE and PSNR of the first `num` images of `split`, on every rank.

    Every rank must call it. Reconstructions decode the mean, as the model does in eval mode.
    """
    read_chunk = split_chunk_reader(data_dir, split, num, batch_size, resolution, accelerator)

    def make_chunk(chunk: int, start: int, end: int) -> dict[str, torch.Tensor]:
        images = read_chunk(chunk, start, end).to(accelerator.device).float().div(255)
        with torch.no_grad():
            mean, logvar = model.encode(images)
            reconstructions = model.decode(mean).float().clamp(0, 1)
        rows = {
            "mean": mean,
            "mse": (reconstructions - images).pow(2).flatten(1).mean(1),
            "psnr": psnr(reconstructions, images),
        }
        if logvar is not None:
            rows["logvar"] = logvar
        return rows

    encoded = distributed_features(accelerator, num, batch_size, make_chunk, None, description)
    return {key: value.squeeze(1) if key in ("mse", "psnr") else value for key, value in encoded.items()}


def pca(latents: torch.Tensor, dims: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents projected on the top `dims` principal axes [N, dims], explained variance ratio [dims]).

    Each axis's sign is fixed so that its largest loading is positive: SVD may return either sign.
    """
    centered = latents.double() - latents.double().mean(0)
    if centered.shape[1] > centered.shape[0]:
        # Wider than tall (a VQ latent: 20480 dims of 2000 images): the N x N Gram matrix has the same
        # nonzero spectrum, and its eigenvectors u give the axes X^T u / s, some 10x faster than the SVD.
        variance, vectors = torch.linalg.eigh(centered @ centered.T)
        variance, vectors = variance.flip(0).clamp_min(0), vectors.flip(1)
        axes = (vectors[:, :dims].T @ centered) / variance[:dims, None].sqrt().clamp_min(1e-150)
    else:
        _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
        axes, variance = vh[:dims], singular.pow(2)
    axes = axes * torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return (centered @ axes.T).float(), (variance[:dims] / variance.sum().clamp_min(1e-300)).float()


def tsne(latents: torch.Tensor, seed: int) -> tuple[torch.Tensor | None, dict]:
    """2-D t-SNE (scikit-learn, optional) and its settings, or (None, {"skipped": why})."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as error:
        missing = error.name is not None and error.name.split(".")[0] == "sklearn"
        return None, {"skipped": TSNE_MISSING if missing else f"t-SNE skipped: scikit-learn does not import ({error})"}
    # The usual preprocessing: PCA to <= 50 dimensions removes noise and makes t-SNE much faster.
    reduced, _ = pca(latents, min(50, *latents.shape))
    perplexity = float(min(30.0, (latents.shape[0] - 1) / 3))
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        reduced.double().numpy()
    )
    return torch.from_numpy(embedded).float(), {"perplexity": perplexity, "pca_dims": reduced.shape[1], "seed": seed}


def aggregate_moments(means: torch.Tensor, logvar: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the aggregate posterior q(z) = E_x q(z|x) over the images (float64).

    Law of total covariance: Cov(z) = Cov(E[z|x]) + E[Cov(z|x)]; an AE's code is a point, so the
    second term is zero. Leaving it out for a VAE would call its collapsed dimensions (mean 0,
    variance 1 for every input, i.e. exactly the prior) degenerate.
    """
    x = means.double()
    covariance = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    if logvar is not None:
        covariance = covariance + torch.diag(logvar.double().exp().mean(0))
    return x.mean(0), covariance


def is_singular(covariance: torch.Tensor) -> bool:
    """Numerically singular: the smallest eigenvalue is within rounding of zero (numpy's matrix_rank tolerance).

    slogdet alone is not enough: a rank-deficient covariance (fewer images than dimensions) often
    comes out with tiny positive eigenvalues and a finite, meaningless log-determinant.
    """
    eigenvalues = torch.linalg.eigvalsh(covariance.double())
    return bool(eigenvalues.min() <= eigenvalues.max().abs() * covariance.shape[0] * torch.finfo(torch.float64).eps)


def kl_to_standard_normal(mean: torch.Tensor, covariance: torch.Tensor) -> float | None:
    """KL(N(mean, covariance) || N(0, I)); None if the covariance is singular (e.g. fewer images than dimensions)."""
    if is_singular(covariance):
        return None
    sign, logdet = torch.linalg.slogdet(covariance)
    if sign <= 0 or not torch.isfinite(logdet):
        return None
    return float(0.5 * (covariance.trace() + mean.dot(mean) - mean.shape[0] - logdet))


def gaussian_fit(means: torch.Tensor, logvar: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """aggregate_moments, or None when the latent has more than MAX_FULL_FIT_DIMS dimensions."""
    return None if means.shape[1] > MAX_FULL_FIT_DIMS else aggregate_moments(means, logvar)


def kl_diagonal_to_standard_normal(mean: torch.Tensor, variance: torch.Tensor) -> float | None:
    """KL(N(mean, diag(variance)) || N(0, I)): the fit without correlations; None if a dimension has no variance."""
    kl = 0.5 * (variance + mean.pow(2) - 1 - variance.log()).sum()
    return float(kl) if torch.isfinite(kl) else None


def latent_statistics(means: torch.Tensor, logvar: torch.Tensor | None) -> dict:
    """Per-dimension mean/std, Gaussian fits of the aggregate posterior against N(0, I), and active dimensions."""
    x = means.double()
    num, dim = x.shape
    mean = x.mean(0)
    variance = x.var(0) if logvar is None else x.var(0) + logvar.double().exp().mean(0)  # the covariance's diagonal
    stats = {
        "dim": dim,
        "per_dim_mean": mean.tolist(),
        "per_dim_std": x.std(0).tolist(),  # of the codes / posterior means
        "mean_abs_mean": float(mean.abs().mean()),
        "mean_std": float(x.std(0).mean()),
        # Burda et al. (2016): a dimension is active if its code moves with the input (Var > 0.01).
        "active_dims": int((x.var(0) > 0.01).sum()),
        "kl_gaussian_fit": None,
        "kl_diagonal_gaussian_fit": kl_diagonal_to_standard_normal(mean, variance),
    }
    fit = gaussian_fit(x, logvar)
    if fit is None:
        stats["kl_gaussian_fit_note"] = (
            f"not computed: a full covariance of {dim} dims is too large (limit {MAX_FULL_FIT_DIMS}); see kl_diagonal_gaussian_fit"
        )
    else:
        stats["kl_gaussian_fit"] = kl_to_standard_normal(*fit)
        if stats["kl_gaussian_fit"] is None:
            stats["kl_gaussian_fit_note"] = (
                f"singular covariance: {num} latents in {dim} dims; see kl_diagonal_gaussian_fit"
            )
    if logvar is not None:
        stats["per_dim_aggregate_std"] = variance.sqrt().tolist()  # with the posterior variance: 1 under the prior
        stats["posterior_kl_mean"] = float(gaussian_kl(x, logvar.double()).mean())
    return stats


def encode_labels(values: list[str]) -> tuple[torch.Tensor, list[str]]:
    classes = sorted(set(values))
    index = {value: i for i, value in enumerate(classes)}
    return torch.tensor([index[value] for value in values]), classes


def knn_accuracy(
    latents: torch.Tensor, labels: torch.Tensor, k: int = 5, test_fraction: float = 0.5, seed: int = 0
) -> dict:
    """k-NN classification of `labels` from the latents on a held-out split, with the majority-class baseline."""
    num = latents.shape[0]
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    num_test = min(num - 1, max(1, round(num * test_fraction)))
    test, train = order[:num_test], order[num_test:]
    k = min(k, len(train))
    distances = torch.cdist(
        latents[test].double(), latents[train].double(), compute_mode="donot_use_mm_for_euclid_dist"
    )
    nearest = distances.topk(k, largest=False).indices  # nearest first
    num_classes = int(labels.max()) + 1
    # One vote each, plus a bonus far below one that grows with closeness: ties go to the nearer neighbours.
    weights = (1 + 1e-3 * torch.arange(k, 0, -1, dtype=torch.float64)).expand(len(test), k)
    votes = torch.zeros(len(test), num_classes, dtype=torch.float64).scatter_add_(1, labels[train][nearest], weights)
    majority = torch.bincount(labels[train], minlength=num_classes).argmax()
    return {
        "k": k,
        "num_train": len(train),
        "num_test": len(test),
        "num_classes": len(labels[train].unique()),
        "accuracy": float((votes.argmax(1) == labels[test]).double().mean()),
        "majority_baseline": float((labels[test] == majority).double().mean()),
    }


def mahalanobis(points: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor | None:
    """sqrt((z - mean)^T covariance^-1 (z - mean)) of each row; None if the covariance is singular."""
    factor, info = torch.linalg.cholesky_ex(covariance.double())
    if info != 0 or is_singular(covariance):
        return None
    whitened = torch.linalg.solve_triangular(factor, (points.double() - mean.double()).T, upper=False)
    return whitened.pow(2).sum(0).sqrt()


def slerp(a: torch.Tensor, b: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation a -> b at `fractions` [S] -> [S, *a.shape]; linear when a and b are (anti)parallel."""
    a64, b64, t = a.double().flatten(), b.double().flatten(), fractions.double()[:, None]
    cosine = (a64.dot(b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)).clamp(-1, 1)
    angle = torch.arccos(cosine)
    if torch.sin(angle) < 1e-6:
        path = (1 - t) * a64 + t * b64
    else:
        path = (torch.sin((1 - t) * angle) * a64 + torch.sin(t * angle) * b64) / torch.sin(angle)
    return path.to(a.dtype).reshape(len(fractions), *a.shape)


def interpolate(a: torch.Tensor, b: torch.Tensor, steps: int, spherical: bool) -> torch.Tensor:
    """`steps` latents from a to b, both included: slerp for a Gaussian-prior latent, else straight."""
    fractions = torch.linspace(0, 1, steps, dtype=torch.float64)
    if spherical:
        return slerp(a, b, fractions)
    t = fractions[:, None]
    return ((1 - t) * a.double().flatten() + t * b.double().flatten()).to(a.dtype).reshape(steps, *a.shape)


def choose_attribute_value(values: list[str], attr: str, requested: str | None) -> str:
    """`requested`, else the most common value other than "none" (ties: alphabetical); some images must lack it."""
    counts = Counter(values)
    if requested is not None and requested not in counts:
        raise ConfigError(
            f"--attr-value {requested}: no image has {attr}={requested}; values: {', '.join(sorted(counts))}"
        )
    candidates = (
        [requested]
        if requested is not None
        else sorted((v for v in counts if v != "none" and counts[v] < len(values)), key=lambda v: (-counts[v], v))
    )
    if not candidates or counts[candidates[0]] == len(values):
        raise ConfigError(
            f"--attr {attr}: no value that some images have and others lack (values: {', '.join(sorted(counts))}), so no attribute vector"
        )
    return candidates[0]


def attribute_vector(latents: torch.Tensor, values: list[str], value: str) -> tuple[torch.Tensor, int, int]:
    """Mean latent of the images with `value` minus that of the others, and both group sizes."""
    has = torch.tensor([v == value for v in values])
    if has.all() or not has.any():
        raise ConfigError(
            f"--attr-value {value}: {'every' if has.all() else 'no'} image has it, so there is no difference to take"
        )
    return latents[has].mean(0) - latents[~has].mean(0), int(has.sum()), int((~has).sum())


@torch.no_grad()
def _decode(model, latents: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.decode(latents.reshape(-1, *latent_shape).to(device)).float().clamp(0, 1).cpu()


@torch.no_grad()
def study_run(
    model, encoded: dict[str, torch.Tensor], images: torch.Tensor, values: list[str], options: StudyOptions
) -> tuple[dict, dict]:
    """Numbers (for latent.json) and pictures (for figures.py) of every view of one run.

    encoded: encode_split's rows of N val images; images: uint8, the first few of them; values: `options.attr` of all N.
    """
    means, logvar = encoded["mean"], encoded.get("logvar")
    spherical = logvar is not None  # a latent trained towards N(0, I): interpolate on the sphere
    device = next(model.parameters()).device
    latent_shape = model.encode(images[:1].to(device).float().div(255))[0].shape[1:]
    shown = images.shape[0]
    reconstructions = _decode(model, means[:shown], latent_shape)
    numbers, pictures = {}, {}

    show = min(options.show, shown)
    numbers["reconstruction"] = {
        "num": means.shape[0],
        "mse_mean": float(encoded["mse"].double().mean()),
        "psnr_mean": float(encoded["psnr"].double().mean()),
        "psnr_median": float(encoded["psnr"].double().median()),
        "shown": show,
        "per_image": {"mse": encoded["mse"].tolist(), "psnr": encoded["psnr"].tolist()},
    }
    pictures["reconstruction"] = (images[:show].float().div(255), reconstructions[:show])

    projected, explained = pca(means)
    embedded, tsne_record = tsne(means, options.seed)
    labels, _ = encode_labels(values)
    numbers["latent_map"] = {
        "attr": options.attr,
        # an optional attribute of the latent model: what a latent is, for the records
        "latent": getattr(model, "latent_description", "posterior means" if spherical else "codes"),
        "pca_explained_variance_ratio": explained.tolist(),
        "tsne": tsne_record,
        "knn": knn_accuracy(means, labels, options.k, options.knn_test_fraction, options.seed),
        **latent_statistics(means, logvar),
    }
    pictures["latent_map"] = {
        "pca": projected,
        "tsne": embedded,
        "tsne_note": tsne_record.get("skipped"),
        "values": values,
    }

    numbers["generation"], pictures["generation"] = _generation(model, means, logvar, latent_shape, options)

    pairs = [(2 * i, 2 * i + 1) for i in range(min(options.pairs, shown // 2))]
    rows = torch.stack(
        [_decode(model, interpolate(means[a], means[b], options.steps, spherical), latent_shape) for a, b in pairs]
    )
    endpoints = torch.stack([reconstructions[[a for a, _ in pairs]], reconstructions[[b for _, b in pairs]]], 1)
    numbers["interpolation"] = {
        "kind": "slerp" if spherical else "linear",
        "pairs": pairs,
        "steps": options.steps,
        "endpoint_max_abs_diff": float((rows[:, [0, -1]] - endpoints).abs().max()),
    }
    pictures["interpolation"] = rows

    value = choose_attribute_value(values, options.attr, options.attr_value)
    vector, num_with, num_without = attribute_vector(means, values, value)
    without = [i for i in range(shown) if values[i] != value]
    faces = (without + [i for i in range(shown) if values[i] == value])[: options.faces]
    strengths = torch.tensor(options.strengths, dtype=means.dtype)
    grid = torch.stack([_decode(model, means[i] + strengths[:, None] * vector, latent_shape) for i in faces])
    numbers["attribute_vector"] = {
        "attr": options.attr,
        "value": value,
        "num_with": num_with,
        "num_without": num_without,
        "norm": float(vector.norm()),
        "strengths": list(options.strengths),
        "faces": faces,
        "face_values": [values[i] for i in faces],
    }
    pictures["attribute_vector"] = grid
    return numbers, pictures


def _generation(
    model, means: torch.Tensor, logvar: torch.Tensor | None, latent_shape: torch.Size, options: StudyOptions
) -> tuple[dict, torch.Tensor | None]:
    """Prior samples z ~ N(0, I) through the decoder and how far they lie from the codes; (record, None) where the model has no such prior."""
    # An optional attribute of the latent model: why decoding z ~ N(0, I) means nothing for it (e.g. a VQ model).
    not_applicable = getattr(model, "no_gaussian_prior", None)
    if not_applicable:
        return {"skipped": not_applicable}, None
    spherical = logvar is not None
    generator = torch.Generator().manual_seed(options.seed)
    prior = torch.randn(options.prior_samples, means.shape[1], generator=generator)
    # What the decoder was trained on: the codes (AE), samples z ~ q(z|x) (VAE). Under the Gaussian fit
    # of their distribution a code lies about sqrt(D) from the mean; a prior draw much farther lies
    # where the decoder never had an input. (Euclidean distances say little here: in high dimension
    # they concentrate, and the AE's trouble is the directions its codes never take, not their scale.)
    codes = means if logvar is None else means + torch.randn(means.shape, generator=generator) * (0.5 * logvar).exp()
    fit = gaussian_fit(means, logvar)
    prior_distance, code_distance = (
        (None, None) if fit is None else (mahalanobis(prior, *fit), mahalanobis(codes, *fit))
    )
    record = {
        "num": options.prior_samples,
        "latent": "z ~ N(0, I)",
        "seed": options.seed,
        "codes": "z ~ q(z|x)" if spherical else "encoder outputs",
        "mahalanobis_prior_median": None if prior_distance is None else float(prior_distance.median()),
        "mahalanobis_code_median": None if code_distance is None else float(code_distance.median()),
        "mahalanobis_typical": math.sqrt(means.shape[1]),
    }
    return record, _decode(model, prior, latent_shape)
