"""Vector quantizer shared by every VQ model (VQ-VAE, VQ-VAE2, VQ-GAN).

Straight-through estimator, commitment loss beta * ||z - sg[e]||^2, and two codebook update rules: `loss`
(||sg[z] - e||^2, van den Oord et al. 2017) and `ema` (Razavi et al. 2019); k-means init, dead-code
restart, l2-normalised codes. Codebooks are identical on every rank by construction (why ours: docs/choices.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# torch.distributed directly, like nn.SyncBatchNorm: the sync is a property of the layer, not of the launcher.


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(tensor)
    return tensor


def _broadcast_from_first(tensor: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def _all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped [N, D] tensors of every rank, in rank order."""
    if _world() == 1:
        return rows
    gathered = [torch.empty_like(rows) for _ in range(_world())]
    dist.all_gather(gathered, rows.contiguous())
    return torch.cat(gathered)


def kmeans(vectors: torch.Tensor, num_clusters: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd k-means from a k-means++ start (random starts merge clusters); an empty cluster keeps its centre."""
    first = torch.randint(0, vectors.shape[0], (1,), generator=generator).item()
    centres = [vectors[first]]
    nearest = (vectors - vectors[first]).pow(2).sum(1)
    for _ in range(1, num_clusters):
        weights = nearest.double().cpu() + 1e-12  # D^2 sampling; the generator lives on the CPU
        pick = torch.multinomial(weights / weights.sum(), 1, generator=generator).item()
        centres.append(vectors[pick])
        nearest = torch.minimum(nearest, (vectors - vectors[pick]).pow(2).sum(1))
    centres = torch.stack(centres)
    for _ in range(iterations):
        assignment = torch.cdist(vectors, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, vectors)
        counts = torch.bincount(assignment, minlength=num_clusters).unsqueeze(1).to(vectors.dtype)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution given by `counts` (or shares): the effective number of codes used."""
    probabilities = counts.float() / counts.float().sum().clamp(min=1e-12)
    return torch.exp(-(probabilities * torch.log(probabilities.clamp(min=1e-12))).sum())


class VectorQuantizer(nn.Module):
    """Quantizes a [B, D, H, W] map to the nearest of `num_codes` D-dimensional codes.

    Returns (quantized with straight-through gradient, indices [B, H, W], loss, stats).
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        update: str = "ema",
        decay: float = 0.99,
        kmeans_init: bool = True,
        dead_code_steps: int = 0,
        cosine: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__()
        if update not in ("ema", "loss"):
            raise ValueError(f"codebook update '{update}' is not one of ema, loss")
        self.num_codes, self.dim, self.beta, self.update, self.decay = num_codes, dim, beta, update, decay
        self.kmeans_init, self.dead_code_steps, self.cosine, self.eps = kmeans_init, dead_code_steps, cosine, eps
        # A Parameter in both modes (frozen under EMA) so parameter checksums and EMA-of-weights cover it.
        initial = torch.randn(num_codes, dim) if not cosine else F.normalize(torch.randn(num_codes, dim), dim=1)
        self.codebook = nn.Parameter(initial, requires_grad=update == "loss")
        # EMA of assignment counts (all modes: telemetry). Starts at one pick per code, matching embed_sum = codes,
        # so that the first EMA update keeps the codes where they are instead of dividing by ~0.
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_sum", initial.clone())  # EMA of assigned vector sums (ema mode)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long))
        self.register_buffer("restarts", torch.zeros((), dtype=torch.long))

    def _codes(self) -> torch.Tensor:
        codes = self.codebook.float()
        return F.normalize(codes, dim=1) if self.cosine else codes

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of `flat` [N, D] (fp32)."""
        codes = self._codes()
        if self.cosine:
            return (flat @ codes.t()).argmax(1)
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
        return distances.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, H, W] -> code vectors [B, D, H, W]."""
        return F.embedding(indices, self._codes()).permute(0, 3, 1, 2).contiguous()

    def forward(self, latents: torch.Tensor):
        with torch.autocast(latents.device.type, enabled=False):  # distances and EMA sums lose codes in bf16
            return self._quantize(latents.float())

    def _quantize(self, latents: torch.Tensor):
        batch, _, height, width = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, self.dim)
        if self.cosine:
            flat = F.normalize(flat, dim=1)
            latents = flat.view(batch, height, width, self.dim).permute(0, 3, 1, 2)
        if self.training and not bool(self.initialized):
            self._kmeans_init(flat.detach())
        indices = self.nearest(flat.detach())
        quantized = self.lookup(indices.view(batch, height, width))
        commitment = F.mse_loss(latents, quantized.detach())
        loss = self.beta * commitment
        if self.update == "loss":
            loss = loss + F.mse_loss(quantized, latents.detach())
        counts = torch.bincount(indices, minlength=self.num_codes).float()
        if self.training:  # collectives in training mode only: evaluation on one rank never waits on the others
            # One slot more for "this rank saw a NaN/inf latent": the loop will skip the step, and the
            # codebook must not learn from it either (it would carry the NaN to every rank for good).
            non_finite = (~torch.isfinite(flat).all()).float().reshape(1)
            reduced = _all_reduce_sum(torch.cat([counts, non_finite]))
            counts = reduced[:-1]
            if reduced[-1] == 0:
                self._track_usage(counts)
                if self.update == "ema":
                    self._ema_update(flat.detach(), indices, counts)
                if self.dead_code_steps:
                    self._restart_dead_codes(flat.detach())
        quantized = latents + (quantized - latents).detach()  # straight-through
        return quantized, indices.view(batch, height, width), loss, self._stats(counts, commitment)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        sample = flat[torch.randperm(flat.shape[0], device=flat.device)[: max(4 * self.num_codes, 4096)]]
        # Same sized sample on every rank (equal per-rank batches), gathered: every rank clusters the same data.
        everyone = _all_gather_rows(sample)
        centres = kmeans(everyone, self.num_codes, iterations=10, generator=torch.Generator().manual_seed(0))
        # Same data and seed on every rank, but CUDA's atomic index_add_ may round differently: rank 0's wins.
        centres = _broadcast_from_first(centres)
        if self.cosine:
            centres = F.normalize(centres, dim=1)
        self.codebook.data.copy_(centres)
        self.embed_sum.copy_(centres)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _track_usage(self, counts: torch.Tensor) -> None:
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, indices, flat)
        sums = _all_reduce_sum(sums)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        # Laplace: no division by 0
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        codes = self.embed_sum / smoothed.unsqueeze(1)
        self.codebook.data.copy_(F.normalize(codes, dim=1) if self.cosine else codes)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Re-seed codes unused for `dead_code_steps` steps from current encoder outputs."""
        dead = self.steps_unused >= self.dead_code_steps  # identical on every rank (from all-reduced counts)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        local = flat[torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)]
        candidates = _all_gather_rows(local)[:num_dead]  # rank 0's picks first; same tensor on every rank
        self.codebook.data[dead] = candidates.to(self.codebook.dtype)
        self.embed_sum[dead] = candidates
        self.cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0
        self.restarts.add_(num_dead)

    def _stats(self, counts: torch.Tensor, commitment: torch.Tensor) -> dict[str, torch.Tensor]:
        window = self.dead_code_steps or 100
        return {
            "perplexity": perplexity(counts).detach(),  # effective number of codes used in this batch
            "used_frac": (self.steps_unused < window).float().mean().detach(),  # codes used within the window
            "dead_codes": (self.steps_unused >= window).float().sum().detach(),
            "restarts": self.restarts.float().detach(),
            "commitment": commitment.detach(),
        }

    def usage(self) -> torch.Tensor:
        """Exponential moving average of how often each code is picked (for the usage histogram)."""
        return self.cluster_size.detach().clone()

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, beta={self.beta}, update={self.update}, cosine={self.cosine}"
        )
