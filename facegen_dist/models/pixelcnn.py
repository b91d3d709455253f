"""Gated PixelCNN prior over discrete VQ codes, with an exact fast sampler.

van den Oord et al. 2016: vertical and horizontal stacks, so no blind spot; optionally conditioned on a
coarser code grid (VQ-VAE-2's bottom prior). Design notes (the two stacks, why the fast sampler draws the
naive loop's codes): docs/vqvae.md.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# choose(i, j, logits [num, K]) -> codes [num] for position (i, j); the decode loops call it in raster order.
Chooser = Callable[[int, int, torch.Tensor], torch.Tensor]


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) over the two channel halves of x."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: scores [num, K] with -inf outside the smallest set of largest scores whose softmax mass is >= top_p.

    The softmax is taken in fp32 (or wider); top_p >= 1 keeps everything.
    """
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if top_p >= 1.0:
        return scores
    sorted_scores, order = scores.sort(dim=1, descending=True)
    mass = sorted_scores.softmax(dim=1).cumsum(dim=1)
    # Keep a code while the codes ranked above it hold < top_p mass: the first code is always kept.
    drop_sorted = torch.cat([torch.zeros_like(mass[:, :1], dtype=torch.bool), mass[:, :-1] >= top_p], dim=1)
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def draw_codes(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """One categorical draw per row of logits [num, K] by the Gumbel-max trick.

    The uniforms are drawn on the CPU (generator must be a CPU generator) whatever the device of
    the logits, so a seed gives the same codes on every device and in both samplers.
    top_k (0: off) keeps the k largest logits; top_p (1: off) then keeps the nucleus of
    softmax(logits / temperature), see `top_p_filter`. Scores are fp32 (or wider) throughout.
    """
    u = torch.rand(logits.shape, generator=generator).to(logits.device)
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if top_k:
        kth = scores.topk(top_k, dim=1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-10)))
    return (top_p_filter(scores / temperature, top_p) + gumbel).argmax(dim=1)


def _masked_weight(conv: nn.Conv2d, mask: torch.Tensor | None) -> torch.Tensor:
    return conv.weight if mask is None else conv.weight * mask


class GatedLayer(nn.Module):
    """One gated layer: a vertical stack (rows above) and a horizontal stack (current row, to the left)."""

    def __init__(self, channels: int, kernel_size: int, mask_type: str, conditional: bool):
        super().__init__()
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        self.mask_type = mask_type
        self.pad = p = kernel_size // 2
        self.vertical = nn.Conv2d(channels, 2 * channels, (p + 1, kernel_size))
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, p + 1))
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.residual = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Conv2d(channels, 2 * channels, 1) if conditional else None
        vmask = hmask = None
        if mask_type == "A":
            vmask = torch.ones(1, 1, p + 1, kernel_size)
            vmask[:, :, -1] = 0  # the current row: layer A's vertical stack sees rows strictly above
            hmask = torch.ones(1, 1, 1, p + 1)
            hmask[..., -1] = 0  # the current code
        self.register_buffer("vmask", vmask, persistent=False)
        self.register_buffer("hmask", hmask, persistent=False)

    def vertical_out(
        self, v_padded: torch.Tensor, cond_features: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertical stack on a stream already padded by p rows on top and p columns either side.

        Returns (gated vertical output, link bias for the horizontal stack), both over the unpadded rows.
        """
        pre = F.conv2d(v_padded, _masked_weight(self.vertical, self.vmask), self.vertical.bias)
        bias = self.cond(cond_features) if self.cond is not None else 0.0
        return gate(pre + bias), self.link(pre) + bias

    def horizontal_out(self, h_padded: torch.Tensor, link_bias: torch.Tensor) -> torch.Tensor:
        """Horizontal stack on a stream padded by p columns on the left: [B, C, rows, p + w] -> [B, C, rows, w]."""
        pre = F.conv2d(h_padded, _masked_weight(self.horizontal, self.hmask), self.horizontal.bias)
        out = self.residual(gate(pre + link_bias))
        return out + h_padded[..., self.pad :] if self.mask_type == "B" else out

    def horizontal_column(self, window: torch.Tensor, link_bias: torch.Tensor) -> torch.Tensor:
        """`horizontal_out` for one output column, as matrix products: on such small inputs they cost a
        fraction of a conv call. window: the input's columns j-p..j [B, C, 1, p+1]; link_bias [B, 2C] -> [B, C].
        """
        weight = _masked_weight(self.horizontal, self.hmask).flatten(1)  # [2C, C * (p+1)], the window's order
        pre = F.linear(window.reshape(len(window), -1), weight, self.horizontal.bias)
        out = F.linear(gate(pre + link_bias), self.residual.weight.flatten(1), self.residual.bias)
        return out + window[:, :, 0, -1] if self.mask_type == "B" else out

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, cond_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.pad
        v_out, link_bias = self.vertical_out(F.pad(v, (p, p, p, 0)), cond_features)
        return v_out, self.horizontal_out(F.pad(h, (p, 0, 0, 0)), link_bias)


class GatedPixelCNN(nn.Module):
    """Autoregressive prior p(codes | cond) over a [H, W] grid of codes in raster order."""

    def __init__(
        self,
        num_codes: int,
        channels: int = 128,
        num_layers: int = 12,
        kernel_size: int = 5,
        cond_codes: int = 0,
        cond_scale: int = 2,
    ):
        super().__init__()
        if num_codes < 2 or channels < 1 or num_layers < 1:
            raise ValueError(
                f"need num_codes >= 2, channels >= 1, num_layers >= 1; got {num_codes}, {channels}, {num_layers}"
            )
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if cond_codes < 0 or cond_scale < 1:
            raise ValueError(f"need cond_codes >= 0 and cond_scale >= 1; got {cond_codes}, {cond_scale}")
        self.num_codes = num_codes
        self.channels = channels
        self.kernel_size = kernel_size
        self.cond_codes = cond_codes
        self.cond_scale = cond_scale
        self.embed = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel_size, "A" if n == 0 else "B", conditional=cond_codes > 0)
            for n in range(num_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, num_codes, 1)
        )
        if cond_codes:
            self.cond_embed = nn.Embedding(cond_codes, channels)
            self.cond_net = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
            )
        else:
            self.cond_embed = self.cond_net = None

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.embed(codes).permute(0, 3, 1, 2).contiguous()

    def _cond_features(self, cond: torch.Tensor | None, batch: int, height: int, width: int) -> torch.Tensor | None:
        if not self.cond_codes:
            if cond is not None:
                raise ValueError("this GatedPixelCNN is unconditional (cond_codes=0) but got cond")
            return None
        if cond is None:
            raise ValueError(f"this GatedPixelCNN is conditional (cond_codes={self.cond_codes}): pass cond")
        s = self.cond_scale
        if cond.dim() != 3 or cond.shape[0] != batch or (cond.shape[1] * s, cond.shape[2] * s) != (height, width):
            raise ValueError(
                f"cond must be [{batch}, {height}/{s}, {width}/{s}] for a {height}x{width} grid, got {list(cond.shape)}"
            )
        x = self.cond_net(self.cond_embed(cond).permute(0, 3, 1, 2).contiguous())
        return F.interpolate(x, scale_factor=s, mode="nearest") if s > 1 else x

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, H, W] int64 -> logits [B, num_codes, H, W]; (i, j) sees only codes before it in raster order."""
        if codes.dim() != 3:
            raise ValueError(f"codes must be [B, H, W], got {list(codes.shape)}")
        cond_features = self._cond_features(cond, *codes.shape)
        v = h = self._embed(codes)
        for layer in self.layers:
            v, h = layer(v, h, cond_features)
        return self.head(h)

    def loss(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per code, in fp32 even under autocast."""
        return F.cross_entropy(self(codes, cond).float(), codes)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        height: int,
        width: int,
        cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        fast: bool = True,
    ) -> torch.Tensor:
        """num grids of codes [num, H, W] on the model's device.

        generator: a CPU generator (the uniforms are drawn on the CPU, see `draw_codes`).
        top_k: keep the k largest logits per position (0: all). fast=False is the naive reference
        (one full forward per position); both give the same codes for the same generator state.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        top_k = min(top_k, self.num_codes)

        def choose(i: int, j: int, logits: torch.Tensor) -> torch.Tensor:
            return draw_codes(logits, generator, temperature, top_k)

        return self._decode(num, height, width, cond, choose, fast)

    @torch.no_grad()
    def _decode(
        self, num: int, height: int, width: int, cond: torch.Tensor | None, choose: Chooser, fast: bool
    ) -> torch.Tensor:
        if num < 1 or height < 1 or width < 1:
            raise ValueError(f"need num, height, width >= 1; got {num}, {height}, {width}")
        device = self.embed.weight.device
        if cond is not None:
            cond = cond.to(device)
        decode = self._decode_fast if fast else self._decode_naive
        return decode(num, height, width, cond, choose)

    def _decode_naive(
        self, num: int, height: int, width: int, cond: torch.Tensor | None, choose: Chooser
    ) -> torch.Tensor:
        """Reference: a full forward over the whole grid for every position."""
        codes = torch.zeros(num, height, width, dtype=torch.long, device=self.embed.weight.device)
        for i in range(height):
            for j in range(width):
                codes[:, i, j] = choose(i, j, self(codes, cond)[:, :, i, j])
        return codes

    def _decode_fast(
        self, num: int, height: int, width: int, cond: torch.Tensor | None, choose: Chooser
    ) -> torch.Tensor:
        """Vertical stacks once per row, then per position one column of each horizontal stack, and the head."""
        weight = self.embed.weight
        codes = torch.zeros(num, height, width, dtype=torch.long, device=weight.device)
        cond_features = self._cond_features(cond, num, height, width)
        p = self.kernel_size // 2
        # windows[l]: rows i-p..i of the input of layer l's vertical conv (the embedded codes for layer 0,
        # layer l-1's vertical output after). Starting as zeros, they hold the full conv's top padding.
        windows = [weight.new_zeros(num, self.channels, p + 1, width) for _ in self.layers]
        for i in range(height):
            cond_row = cond_features[:, :, i : i + 1] if cond_features is not None else None
            # Row i of the codes is not drawn yet: a zero row, hidden by layer A's vertical mask, filled below.
            windows[0] = torch.cat([windows[0][:, :, 1:], weight.new_zeros(num, self.channels, 1, width)], dim=2)
            link_biases = self._vertical_rows(windows, cond_row)
            # rows[l]: layer l's horizontal input along row i after p zero columns (the full conv's left padding):
            # the embedded codes for layer 0, layer l-1's horizontal output after. Filled column by column.
            rows = [weight.new_zeros(num, self.channels, 1, p + width) for _ in self.layers]
            for j in range(width):
                logits = self._logits_at(rows, link_biases, j)
                codes[:, i, j] = choose(i, j, logits)
                rows[0][:, :, 0, p + j] = self.embed(codes[:, i, j])
            windows[0][:, :, -1:] = rows[0][..., p:]
        return codes

    def _vertical_rows(self, windows: list[torch.Tensor], cond_row: torch.Tensor | None) -> list[torch.Tensor]:
        """Run every layer's vertical stack for the current row; push each output into the next layer's window.

        Returns each layer's link bias for the horizontal stack on this row, [num, 2C, 1, W].
        """
        p = self.kernel_size // 2
        link_biases = []
        for n, layer in enumerate(self.layers):
            v_row, link_bias = layer.vertical_out(F.pad(windows[n], (p, p)), cond_row)
            link_biases.append(link_bias)
            if n + 1 < len(self.layers):
                windows[n + 1] = torch.cat([windows[n + 1][:, :, 1:], v_row], dim=2)
        return link_biases

    def _logits_at(self, rows: list[torch.Tensor], link_biases: list[torch.Tensor], j: int) -> torch.Tensor:
        """Logits [num, K] at column j: each layer's horizontal output at column j, written into the next layer's row.

        It reads columns j-p..j of each layer's input, all of them already there: columns < j from earlier
        positions, column j from the layer below just now (the embedded code at j is still zero, and masked).
        """
        p = self.kernel_size // 2
        for n, layer in enumerate(self.layers):
            h = layer.horizontal_column(rows[n][..., j : j + p + 1], link_biases[n][:, :, 0, j])
            if n + 1 < len(self.layers):
                rows[n + 1][:, :, 0, p + j] = h
        return self.head(h[:, :, None, None])[:, :, 0, 0]
