"""Reference attention: gathers each sequence's KV slots, applies RoPE by position, and
runs SDPA with the link mask `attend[i, j] = j <= pos_i`.

Keys are stored un-rotated, so the rotation happens here, on the gathered copy; the pool
(and a shared document's slots in it) is only ever read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from epic_sglang.forward_batch import ForwardBatch
from epic_sglang.kv_pool import KVPool
from epic_sglang.models.config import ModelConfig
from epic_sglang.models.rope import Rotary, apply_rotation


class TorchReferenceAttention:
    def __init__(self, cfg: ModelConfig, device: torch.device):
        self.rotary = Rotary(cfg, device)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self._masks: list[dict] = []
        self._key_rope: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._query_rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def plan(self, batch: ForwardBatch) -> None:
        """Per sequence, the SDPA mask arguments and the keys' cos/sin; the queries' cos/sin.
        Shared by every layer of the forward."""
        self._masks = []
        dtype = torch.float32
        self._query_rope = self.rotary.cos_sin(batch.positions, dtype)
        self._key_rope = [self.rotary.cos_sin(torch.arange(s.kv_slots.numel(), device=s.kv_slots.device), dtype)
                          for s in batch.seqs]
        for s in batch.seqs:
            if s.dense:
                self._masks.append({"is_causal": True})
            elif s.last_only:
                self._masks.append({})
            else:
                n = s.kv_slots.numel()
                self._masks.append({"attn_mask": torch.arange(n, device=s.kv_slots.device)[None, :] <= s.q_positions[:, None]})

    def keys_values(self, pool: KVPool, layer: int, s, mask: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """A sequence's keys (un-rotated), values and SDPA mask arguments, as the pool and the plan
        hold them (`benchmarks/querylink_design.py` edits a link's here)."""
        return pool.get_key_buffer(layer)[s.kv_slots], pool.get_value_buffer(layer)[s.kv_slots], mask

    def forward(self, q: torch.Tensor, layer: int, pool: KVPool, batch: ForwardBatch) -> torch.Tensor:
        q = apply_rotation(q, *self._query_rope)
        out = torch.empty_like(q)
        for s, mask, rope in zip(batch.seqs, self._masks, self._key_rope):
            k, v, mask = self.keys_values(pool, layer, s, mask)
            k = apply_rotation(k, *rope)
            o = F.scaled_dot_product_attention(q[s.q_start:s.q_end].transpose(0, 1), k.transpose(0, 1),
                                               v.transpose(0, 1), scale=self.scale, enable_gqa=True, **mask)
            out[s.q_start:s.q_end] = o.transpose(0, 1)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
