"""FlashInfer attention over the paged KV pool (page size 1), RoPE fused in the kernel.

Keys sit un-rotated in the pool; `pos_encoding_mode="ROPE_LLAMA"` rotates each key by its
index in the sequence's KV view, which is its position in the linked prompt. Two ways to
run a link pass whose queries are scattered (LegoLink: the first k tokens of each document
plus the question):

- `runs` (default): each maximal run of consecutive query positions [a, b) becomes one
  causal batch entry over the truncated KV view `kv_slots[:b]`. Bottom-right causal
  alignment then puts query i at position a + i and lets it see keys [0, a + i]: exactly
  the link mask, with no mask tensor.
- `mask`: one entry per sequence over its whole KV view with the custom mask
  `attend[i, j] = j <= pos_i`. The kernel places query i at n - m + i, so queries are first
  rotated by the difference to their true position (rotations compose).

Plan once per forward (all layers share it), run per layer: FlashInfer's own pattern.
"""
from __future__ import annotations

import torch

from epic_sglang.forward_batch import ForwardBatch
from epic_sglang.kv_pool import KVPool
from epic_sglang.models.config import ModelConfig
from epic_sglang.models.rope import inverse_frequencies, rotate_by

WORKSPACE_BYTES = 256 << 20
LINK_MODES = ("runs", "mask")


def query_runs(positions: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive positions, as (index just past the run, position just
    past the run): the run's query count so far and its truncated KV length."""
    return [(i, positions[i - 1] + 1) for i in range(1, len(positions) + 1)
            if i == len(positions) or positions[i] != positions[i - 1] + 1]


class FlashInferAttention:
    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, link_mode: str = "runs"):
        import flashinfer

        if cfg.rope_type not in ("default", "linear"):
            raise ValueError(f"FlashInfer's fused RoPE cannot do rope_type {cfg.rope_type!r}; use attention='torch'")
        if link_mode not in LINK_MODES:
            raise ValueError(f"link_mode must be one of {LINK_MODES}, got {link_mode!r}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"FlashInfer needs bfloat16 or float16 KV, got {dtype}")
        self.cfg, self.device, self.link_mode = cfg, device, link_mode
        rope_scale = float(cfg.rope_scaling["factor"]) if cfg.rope_type == "linear" else 1.0
        self.common = dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=cfg.rope_theta, rope_scale=rope_scale,
                           q_data_type=dtype, kv_data_type=dtype)
        self.inv_freq = inverse_frequencies(cfg).to(device)  # linear scaling included
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
        self._wrapper = self.prefill
        self._q_shift: torch.Tensor | None = None

    def plan(self, batch: ForwardBatch) -> None:
        c = self.cfg
        i32 = dict(dtype=torch.int32, device=self.device)
        self._q_shift = None
        if all(s.last_only for s in batch.seqs):  # decode: one query per sequence, sees all
            lens = [s.kv_slots.numel() for s in batch.seqs]
            self.decode.plan(torch.tensor([0] + lens, **i32).cumsum(0, dtype=torch.int32),
                             torch.cat([s.kv_slots for s in batch.seqs]).to(torch.int32),
                             torch.ones(len(lens), **i32), c.num_heads, c.num_kv_heads, c.head_dim, 1, **self.common)
            self._wrapper = self.decode
            return
        qo, kv_len, kv_idx, masks, shifts = [0], [], [], [], []
        for s in batch.seqs:
            if self.link_mode == "runs" or s.dense:
                for count, end in query_runs(s.q_positions.tolist()):
                    qo.append(s.q_start + count)
                    kv_len.append(end)
                    kv_idx.append(s.kv_slots[:end])
            else:
                n, m = s.kv_slots.numel(), s.num_queries
                qo.append(s.q_end)
                kv_len.append(n)
                kv_idx.append(s.kv_slots)
                masks.append((torch.arange(n, device=self.device)[None, :] <= s.q_positions[:, None]).flatten())
                shifts.append(s.q_positions - (n - m + torch.arange(m, device=self.device)))
        mask = dict(custom_mask=torch.cat(masks)) if masks else dict(causal=True)
        self.prefill.plan(torch.tensor(qo, **i32), torch.tensor([0] + kv_len, **i32).cumsum(0, dtype=torch.int32),
                          torch.cat(kv_idx).to(torch.int32), torch.ones(len(kv_len), **i32),
                          c.num_heads, c.num_kv_heads, c.head_dim, 1, **self.common, **mask)
        if shifts:
            self._q_shift = torch.cat(shifts)
        self._wrapper = self.prefill

    def forward(self, q: torch.Tensor, layer: int, pool: KVPool, batch: ForwardBatch) -> torch.Tensor:
        if self._q_shift is not None:  # mask mode: true position - kernel position
            q = rotate_by(q, self._q_shift, self.inv_freq)
        k = pool.get_key_buffer(layer).unsqueeze(1)  # (slots, page_size=1, kv_heads, head_dim)
        v = pool.get_value_buffer(layer).unsqueeze(1)
        out = self._wrapper.run(q.contiguous(), (k, v))
        return out.reshape(q.shape[0], -1)
