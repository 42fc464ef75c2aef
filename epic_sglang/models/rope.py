"""Rotary position embedding: inverse frequencies (default, linear, llama3) and rotation.

Keys are stored *un-rotated* in the KV pool, so one copy of a document's KV serves every
position; attention rotates queries and keys by their positions in the linked prompt.
"""
from __future__ import annotations

import math

import torch

from epic_sglang.models.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if cfg.rope_type == "linear":
        return inv_freq / scaling["factor"]
    if cfg.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / high) * ~(wavelen > old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary:
    """cos/sin by position from a table that grows on demand (decode re-rotates a
    sequence's keys every step, so the table pays off); `apply_rotation` uses them."""

    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.inv_freq = inverse_frequencies(cfg).to(device)
        self._cos = self._sin = torch.empty(0, cfg.head_dim, device=device)

    def _table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if length > self._cos.shape[0]:
            size = max(1024, 1 << (length - 1).bit_length())
            freqs = torch.arange(size, device=self.inv_freq.device).float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos(), emb.sin()
        return self._cos, self._sin

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._table(int(positions.max()) + 1)
        return cos[positions].to(dtype), sin[positions].to(dtype)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """(tokens, head_dim) fp32: cos then sin of each rotated pair's angle (rotate_copy's layout)."""
        cos, sin = self._table(int(positions.max()) + 1)
        half = cos.shape[-1] // 2
        return torch.cat([cos[positions, :half], sin[positions, :half]], dim=-1)


def apply_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, head_dim). Llama's rotate-half layout."""
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
