"""FlashInfer attention over the paged KV pool (page size 1).

Keys sit un-rotated in the pool, shared by every request that links them. Each forward
picks one of two ways to apply RoPE (measured on an H100 and an H200, BENCHMARKS.md):

- gathered: each layer gathers the batch's K and V into a scratch buffer in
  prompt order, rotating K on the way (one Triton launch, memory bound:
  `epic_sglang.rotate_copy`), and attends it in 16-token pages without positional
  encoding: FA3 for dense prefills (a query run of DENSE_RUN or more: compile, fr, the
  floor), FA2 for link passes' short runs (FA3's 128-row tiles sit half empty on a 16-query
  run), FA2 with the mask for CacheBlend's scattered picks. Also the only way for RoPE the
  kernel cannot do (llama3 scaling).
- fused, in place (link mode `fused`; and decode, always): FlashInfer rotates keys as it
  loads them (`ROPE_LLAMA`, FA2) from the pool's one-slot pages. Nothing is copied, but
  every key tile is re-rotated once per query tile. Knows theta and linear scaling only.

A link pass has scattered queries (LegoLink: the first k tokens of each document plus the
question). Three ways to attend:
- runs (modes `gathered`, `fused`): each maximal run of consecutive query positions [a, b)
  becomes one causal batch entry over the truncated KV view [0, b). Bottom-right causal
  alignment puts query i at position a + i, seeing keys [0, a + i]: exactly the link mask,
  no mask tensor. Each run re-reads its KV prefix, so sequences with more than MAX_RUNS
  runs (CacheBlend's or querylink's scattered picks) use the mask instead, unless cascaded.
- `cascade` (gathered keys): runs are grouped (`CascadeTuning.group` queries); the keys before a
  group's first run are seen by all its queries, so they are one non-causal bulk entry
  per group (FA3: full query tiles, each key tile read once per group, not once per run);
  each run keeps a short causal local entry (FA2) from there to its end (groups of many runs:
  one position-masked Triton entry per tile of queries, `local_attention`). FA3 gives a query
  tile's keys to one CTA whole (no split-KV), so bulk keys are cut into `chunk`-key
  entries that the CTAs share; the partial results merge by their log-sum-exp
  (`epic_sglang.merge_states`, one launch per layer).
- `mask`: one entry per sequence over its whole KV view with the custom mask
  `attend[i, j] = j <= pos_i` (gathered keys; FA2, as FA3 has no custom masks).

`auto` (the default) picks per forward: cascade for long links, fused for short ones.
The runs and entries are `epic_sglang.link_plan`'s (the plugin plans with the same ones).
Plan once per forward (every layer shares it), run per layer: FlashInfer's own pattern.
"""
from __future__ import annotations

import numpy as np
import torch

from epic_sglang.forward_batch import ForwardBatch
from epic_sglang.kv_pool import KVPool
from epic_sglang.link_plan import GATHER_PAGE, CascadeTuning, attention_entries, query_runs, wants_cascade
from epic_sglang.local_attention import LocalTiles, local_attention, local_groups
from epic_sglang.merge_states import MergeIndex, merge_into
from epic_sglang.models.config import ModelConfig
from epic_sglang.models.rope import Rotary, apply_rotation
from epic_sglang.rotate_copy import rotate_copy

WORKSPACE_BYTES = 256 << 20
LINK_MODES = ("auto", "gathered", "cascade", "fused", "mask")
MAX_RUNS = 128  # past this many query runs in one sequence, one masked entry reads less KV
DENSE_RUN = 256  # a query run this long is a dense prefill: gathered keys, FA3

class PagedEntries:
    """Attention entries over pages of `page` keys, collected for one wrapper's plan."""

    def __init__(self, page: int):
        self.page, self.qo, self.pages, self.last_page_len = page, [0], [], []

    def add(self, queries: int, pages: torch.Tensor, k0: int, k1: int) -> None:
        """`queries` rows over keys [k0, k1) of a sequence whose pages are `pages` (k0 on a page)."""
        self.qo.append(self.qo[-1] + queries)
        self.pages.append(pages[k0 // self.page:-(-k1 // self.page)])
        self.last_page_len.append((k1 - k0 - 1) % self.page + 1)

    def plan(self, wrapper, cfg: ModelConfig, device: torch.device, **kwargs) -> None:
        i32 = dict(dtype=torch.int32, device=device)
        kv_indptr = torch.tensor([0] + [len(p) for p in self.pages], **i32).cumsum(0, dtype=torch.int32)
        wrapper.plan(torch.tensor(self.qo, **i32), kv_indptr, torch.cat(self.pages), torch.tensor(self.last_page_len, **i32),
                     cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.page, **kwargs)


class FlashInferAttention:
    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, link_mode: str = "gathered",
                 tuning: CascadeTuning = CascadeTuning()):
        import flashinfer

        if link_mode not in LINK_MODES:
            raise ValueError(f"link_mode must be one of {LINK_MODES}, got {link_mode!r}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"FlashInfer needs bfloat16 or float16 KV, got {dtype}")
        self.cfg, self.device, self.dtype, self.link_mode, self.tuning = cfg, device, dtype, link_mode, tuning
        self.rotary = Rotary(cfg, device)
        self.can_fuse = cfg.rope_type in ("default", "linear")
        self.fused_rope = dict(pos_encoding_mode="ROPE_LLAMA", rope_theta=cfg.rope_theta,
                               rope_scale=float(cfg.rope_scaling.get("factor", 1.0)) if cfg.rope_type == "linear" else 1.0)
        self.workspace = workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # FlashInfer fixes an "auto" wrapper's backend at its first plan, so one wrapper per use.
        self.wrappers = {
            "fa3": flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD"),
            "fa2": flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2"),
            "bulk": flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD"),
            "fused": flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2"),
            "masked": flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2"),
            "decode": flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True),
        }
        self._wrapper = None
        # slots, scratch rows, [cos | sin] (fp32), scratch K, scratch V
        self._gather: tuple[torch.Tensor, ...] | None = None
        self._q_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # queries' cos, sin (gathered path)
        self._merge: MergeIndex | None = None  # cascade: where the bulk entries' results go
        self._local: LocalTiles | None = None  # cascade of scattered picks: its local tiles
        self._q_positions: torch.Tensor | None = None

    def plan(self, batch: ForwardBatch) -> None:
        c = self.cfg
        dtypes = dict(q_data_type=self.dtype, kv_data_type=self.dtype)
        if self.can_fuse and all(s.last_only for s in batch.seqs):  # decode: attend the pool in place
            self.plan_decode(self.wrappers["decode"], [s.kv_slots for s in batch.seqs])
            return
        host_positions = [s.q_positions.tolist() for s in batch.seqs]
        runs = [query_runs(pos) for pos in host_positions]
        mode = self.link_mode
        if mode == "auto":
            mode = "cascade" if wants_cascade([r for seq_runs in runs for r in seq_runs], self.tuning) else "fused"
        # per-run entries re-read their whole key prefix, so many runs take the mask; the
        # cascade's local entries start at their group, so it keeps them
        masked = mode == "mask" or (mode != "cascade" and any(len(r) > MAX_RUNS for r in runs))
        dense = any(count - start >= DENSE_RUN for seq_runs in runs
                    for start, (count, _) in zip([0] + [c for c, _ in seq_runs], seq_runs))
        gathered = masked or dense or mode != "fused" or not self.can_fuse
        cascade = mode == "cascade" and not (masked or dense)

        # Gathered: each sequence's keys in prompt order from a page boundary of the scratch.
        page = GATHER_PAGE if gathered else 1
        local, bulk, masks, rows, bulk_rows, base = PagedEntries(page), PagedEntries(page), [], [], [], 0
        locals_, groups = [], []  # per sequence: its local entries and its pages; the cascade's groups
        for s, seq_runs in zip(batch.seqs, runs):
            n = s.kv_slots.numel()
            first_row = base * page
            if gathered:
                rows.append(torch.arange(base * page, base * page + n, device=self.device))
                pages = torch.arange(base, base + -(-n // page), dtype=torch.int32, device=self.device)
                base += len(pages)
            else:
                pages = s.kv_slots.to(torch.int32)
            if masked:
                local.add(s.num_queries, pages, 0, n)
                masks.append((torch.arange(n, device=self.device)[None, :] <= s.q_positions[:, None]).flatten())
                continue
            seq_bulk, seq_local = attention_entries(seq_runs, page, self.tuning if cascade else None)
            locals_.append((seq_local, pages))
            if cascade:
                groups += [(s.q_start + q0, s.q_start + q1, first_row + k0, k0) for q0, q1, k0 in local_groups(seq_local)]
            for q0, q1, k0, k1 in seq_bulk:
                bulk.add(q1 - q0, pages, k0, k1)
                bulk_rows.append((s.q_start + q0, s.q_start + q1))
        # scattered picks: each group's local keys in one position-masked entry per tile of queries
        masked_local = cascade and self.tuning.masks_local(sum(len(e) for e, _ in locals_), len(groups))
        self._local = LocalTiles.build(groups, np.concatenate([np.asarray(p, dtype=np.int64) for p in host_positions]),
                                       c.num_heads // c.num_kv_heads, self.device) if masked_local else None
        self._q_positions = batch.positions
        for seq_local, pages in [] if masked_local else locals_:
            for q0, q1, k0, k1 in seq_local:
                local.add(q1 - q0, pages, k0, k1)
        if gathered:
            positions = torch.cat([torch.arange(s.kv_slots.numel(), device=self.device) for s in batch.seqs])
            scratch = [torch.empty((base * page, c.num_kv_heads, c.head_dim), dtype=self.dtype, device=self.device)
                       for _ in range(2)]
            self._gather = (torch.cat([s.kv_slots for s in batch.seqs]), torch.cat(rows),
                            self.rotary.angles(positions), *scratch)
            self._q_rope = self.rotary.cos_sin(batch.positions, self.dtype)
            rope = dict(pos_encoding_mode="NONE")
        else:
            self._gather, rope = None, self.fused_rope
        self._wrapper = self.wrappers["masked" if masked else "fa3" if dense else "fa2" if gathered else "fused"]
        mask = dict(custom_mask=torch.cat(masks)) if masked else dict(causal=True)
        if not masked_local:
            local.plan(self._wrapper, c, self.device, **rope, **dtypes, **mask)
        self._merge = MergeIndex.build(bulk_rows, self.device) if bulk_rows else None
        if bulk_rows:
            bulk.plan(self.wrappers["bulk"], c, self.device, **rope, **dtypes, causal=False)

    def plan_decode(self, wrapper, kv_slots: list[torch.Tensor]) -> None:
        """One query at each sequence's last position over its slots, keys rotated in the
        kernel; `wrapper` may be a CUDA-graph one (its buffers are what the graph reads)."""
        c = self.cfg
        lens = torch.tensor([0] + [k.numel() for k in kv_slots], dtype=torch.int32)
        self._wrapper, self._gather, self._merge, self._local = wrapper, None, None, None
        wrapper.plan(lens.cumsum(0, dtype=torch.int32).to(self.device), torch.cat(kv_slots).to(torch.int32),
                     torch.ones(len(kv_slots), dtype=torch.int32, device=self.device),
                     c.num_heads, c.num_kv_heads, c.head_dim, 1, **self.fused_rope,
                     q_data_type=self.dtype, kv_data_type=self.dtype)

    def forward(self, q: torch.Tensor, layer: int, pool: KVPool, batch: ForwardBatch) -> torch.Tensor:
        k, v = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
        if self._gather is None:  # keys read in place (pages of one slot), rotated by the kernel
            return self._wrapper.run(q.contiguous(), (k.unsqueeze(1), v.unsqueeze(1))).reshape(q.shape[0], -1)
        slots, rows, angles, k_scratch, v_scratch = self._gather
        rotate_copy([k], [v], [k_scratch], [v_scratch], slots, rows, angles)
        paged = tuple(t.view(-1, GATHER_PAGE, *t.shape[1:]) for t in (k_scratch, v_scratch))
        q = apply_rotation(q, *self._q_rope).contiguous()
        if self._local is not None:
            out, lse = local_attention(q, k_scratch, v_scratch, self._q_positions, self._local)
        elif self._merge is None:
            return self._wrapper.run(q, paged).reshape(q.shape[0], -1)
        else:
            out, lse = self._wrapper.run(q, paged, return_lse=True)
        if self._merge is None:
            return out.reshape(q.shape[0], -1)
        bulk_q = q[self._merge.query_rows]  # every bulk row reads keys: no zero fill of its output (FlashInfer's default)
        merge_into(out, lse, *self.wrappers["bulk"].run(bulk_q, paged, out=torch.empty_like(bulk_q), return_lse=True),
                   self._merge)
        return out.reshape(q.shape[0], -1)
