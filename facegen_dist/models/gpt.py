"""CodeGPT: a decoder-only transformer prior over VQ code indices (the second stage of VQ-GAN).

After nanoGPT's `model.py`, with one conditioning token in front (taming's sos / class token) and a
KV-cache sampler that draws exactly the uncached reference's codes. Design notes: docs/vqgan.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facegen_dist.models.pixelcnn import draw_codes


def flatten_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes [B, T] or a grid [B, H, W] -> [B, T] (grids in raster order: row by row)."""
    if codes.dim() == 3:
        return codes.reshape(codes.shape[0], -1)
    if codes.dim() != 2:
        raise ValueError(f"codes must be [B, T] or [B, H, W], got {list(codes.shape)}")
    return codes


class LayerCache:
    """One layer's keys and values [B, n_head, max_len, head_dim], pre-allocated and filled position by position."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, h, n, d] after the cached ones; return all keys and values so far."""
        if self.keys is None:
            # Allocated at the first step so it takes the dtype autocast gives k and v.
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        end = self.length + k.shape[2]
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]. With a cache, x is the one newest position: it attends to all cached ones."""
        batch, length, channels = x.shape
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(channels, dim=2))
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            if length != 1:
                raise ValueError(f"a cached step takes one position at a time, got {length}")
            k, v = cache.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, channels)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class CodeGPT(nn.Module):
    """Autoregressive prior p(codes | cond) over seq_len code indices, cond a class id or nothing.

    The head is not tied to the token embedding (as in taming-transformers): with a VQ codebook
    of a few hundred to a few thousand codes tying saves little, and the last code of a sequence
    is never an input, so the two matrices see different training signals.
    """

    def __init__(
        self,
        num_codes: int,
        seq_len: int,
        n_layer: int,
        n_head: int,
        n_embd: int,
        dropout: float = 0.0,
        num_classes: int = 0,
        bias: bool = True,
    ):
        super().__init__()
        if num_codes < 2 or seq_len < 1 or n_layer < 1 or n_head < 1:
            raise ValueError(
                f"need num_codes >= 2, seq_len >= 1, n_layer >= 1, n_head >= 1; "
                f"got {num_codes}, {seq_len}, {n_layer}, {n_head}"
            )
        if n_embd < 1 or n_embd % n_head:
            raise ValueError(f"n_embd must be a positive multiple of n_head, got n_embd={n_embd}, n_head={n_head}")
        if not 0.0 <= dropout < 1.0 or num_classes < 0:
            raise ValueError(f"need 0 <= dropout < 1 and num_classes >= 0; got {dropout}, {num_classes}")
        self.num_codes = num_codes
        self.seq_len = seq_len
        self.num_classes = num_classes
        self.tok_emb = nn.Embedding(num_codes, n_embd)
        self.pos_emb = nn.Embedding(seq_len, n_embd)
        if num_classes:
            self.class_emb = nn.Embedding(num_classes, n_embd)
            self.start = None
        else:
            self.class_emb = None
            self.start = nn.Parameter(torch.empty(n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, num_codes, bias=False)
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.start is not None:
            nn.init.normal_(self.start, mean=0.0, std=0.02)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):  # the projections back into the residual stream (GPT-2)
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding=True leaves out the token, position and class/start embeddings."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            embeddings = [
                self.tok_emb.weight,
                self.pos_emb.weight,
                self.class_emb.weight if self.class_emb is not None else self.start,
            ]
            total -= sum(p.numel() for p in embeddings)
        return total

    def cond_embedding(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The conditioning token [batch, 1, C]: the class embedding, or the learned start vector."""
        if not self.num_classes:
            if cond is not None:
                raise ValueError("this CodeGPT is unconditional (num_classes=0) but got cond")
            return self.start.expand(batch, 1, -1)
        if cond is None:
            raise ValueError(
                f"this CodeGPT is class-conditional (num_classes={self.num_classes}): pass cond, class ids [B]"
            )
        if cond.shape != (batch,) or cond.dtype != torch.long:
            raise ValueError(f"cond must be int64 class ids of shape [{batch}], got {cond.dtype} {list(cond.shape)}")
        # A device sync, but on a GPU an out-of-range id would otherwise be an opaque device-side assert.
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) >= self.num_classes):
            raise ValueError(
                f"class ids must be in [0, {self.num_classes}), got {cond.min().item()}..{cond.max().item()}"
            )
        return self.class_emb(cond)[:, None]

    def _trunk(self, x: torch.Tensor, caches: list[LayerCache] | None = None) -> torch.Tensor:
        """Input embeddings [B, T, C] (positions added) -> logits [B, T, num_codes]."""
        x = self.drop(x)
        for n, block in enumerate(self.blocks):
            x = block(x, caches[n] if caches is not None else None)
        return self.head(self.ln_f(x))

    def forward(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, T] int64, T <= seq_len -> logits [B, T, num_codes]; logits[:, t] sees cond and codes[:, :t] only."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be [B, T] (flatten grids with flatten_codes), got {list(codes.shape)}")
        batch, length = codes.shape
        if not 1 <= length <= self.seq_len:
            raise ValueError(f"sequence length must be in [1, seq_len={self.seq_len}], got {length}")
        x = torch.cat([self.cond_embedding(cond, batch), self.tok_emb(codes[:, :-1])], dim=1)
        return self._trunk(x + self.pos_emb.weight[:length])

    def loss(self, codes: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per code (divide by ln 2 for bits), in fp32 even under autocast.

        codes: [B, T] or a grid [B, H, W] (flattened in raster order).
        """
        codes = flatten_codes(codes)
        return F.cross_entropy(self(codes, cond).float().flatten(0, 1), codes.flatten())

    @torch.no_grad()
    def sample(
        self,
        num: int,
        cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """num sequences of codes [num, seq_len] on the model's device, in eval mode (no dropout).

        generator: a CPU generator (uniforms are drawn on the CPU, see `draw_codes`). top_k: keep the
        k largest logits (0: all); top_p: keep the nucleus of that mass (1: all). use_cache=False is
        the reference that reruns the full prefix every step; both give the same codes for a seed.
        """
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {top_p}")
        top_k = min(top_k, self.num_codes)
        device = self.tok_emb.weight.device
        if cond is not None:
            cond = cond.to(device)
        start = self.cond_embedding(cond, num)  # validates cond before any work

        def choose(logits: torch.Tensor) -> torch.Tensor:
            return draw_codes(logits, generator, temperature, top_k, top_p)

        was_training = self.training
        self.eval()
        try:
            decode = self._decode_cached if use_cache else self._decode_uncached
            return decode(num, start, cond, choose)
        finally:
            self.train(was_training)

    def _decode_uncached(self, num: int, start: torch.Tensor, cond: torch.Tensor | None, choose) -> torch.Tensor:
        """Reference: a full forward over the prefix for every position."""
        codes = torch.zeros(num, self.seq_len, dtype=torch.long, device=start.device)
        for t in range(self.seq_len):
            # codes[:, t] is still a placeholder: forward never reads the last code it is given.
            codes[:, t] = choose(self(codes[:, : t + 1], cond)[:, t])
        return codes

    def _decode_cached(self, num: int, start: torch.Tensor, cond: torch.Tensor | None, choose) -> torch.Tensor:
        """One position per step: embed the newest input token, run it through the blocks against the caches."""
        codes = torch.zeros(num, self.seq_len, dtype=torch.long, device=start.device)
        caches = [LayerCache(self.seq_len) for _ in self.blocks]
        token = start
        for t in range(self.seq_len):
            logits = self._trunk(token + self.pos_emb.weight[t], caches)
            codes[:, t] = choose(logits[:, 0])
            token = self.tok_emb(codes[:, t : t + 1])
        return codes
