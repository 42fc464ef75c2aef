"""A link pass attended as the in-process engine attends it: keys gathered in prompt order.

The shared path (`attention.py`) rotates every query back once per document it follows, so a
32K legolink-16 pass attends and merges 35,280 rotated query rows (33 per query). Here each
layer instead gathers the keys every linked query reads, once, into a scratch in prompt order
(a reused document token's key rotated forward by its document's shift, a private token's
copied as SGLang stored it; one `rotate_copy` launch: the documents are only read), and the
queries, as SGLang rotated them, attend the scratch through the engine's cascade
(`link_plan.attention_entries`: per group of query runs a non-causal bulk entry over the keys
before it, in chunks; per run a causal local entry, or for scattered picks one
position-masked Triton entry per tile, `local_attention`), merged by log-sum-exp: the same
entries as `attention/flashinfer_backend.py`'s `cascade` link mode.

It applies to an extend forward whose requests are all linked link passes reading at most
`MAX_GATHERED_KEYS` keys together (CacheBlend's passes, batches that mix in decodes or plain
requests, and larger ones keep the shared path), and only when
`EPIC_SGLANG_LINK_ATTENTION=gathered`: the default stays the shared path until this one
is measured on a GPU (BENCHMARKS.md, session 22's notes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton

from epic_sglang.link_plan import GATHER_PAGE, CascadeTuning, attention_entries, concat_ranges, query_runs
from epic_sglang.local_attention import LocalTiles, local_attention, local_groups
from epic_sglang.merge_states import MergeIndex, merge_into
from epic_sglang.sglang_plugin.entries import Entries, attend_with_lse, indptr, plan_entries, require_plain_softmax
from epic_sglang.sglang_plugin.link_request import to_device
from epic_sglang.sglang_plugin.rotary import RopeTable, rotated_copy

MODES = ("shared", "gathered")
# keys a forward gathers at most (its scratch: 2 x keys x kv heads x head_dim x 2 B, 1 GiB at the
# 8B shape; eight 32K passes): past it the batch's passes keep the shared path, which copies nothing
MAX_GATHERED_KEYS = 1 << 18


def link_attention_mode() -> str:
    mode = os.environ.get("EPIC_SGLANG_LINK_ATTENTION", "shared")
    if mode not in MODES:
        raise ValueError(f"EPIC_SGLANG_LINK_ATTENTION must be one of {MODES}, got {mode!r}")
    return mode


def gathered_keys(linked: list) -> int:
    """The keys a gathered pass of these link passes reads: each one's positions up to its last query."""
    return sum(int(m.link.layout.extend_positions[-1]) + 1 for m in linked)


@dataclass
class GatheredPass:
    """The batch's link passes over a scratch of their keys in prompt order: request i's key at
    prompt position p in scratch row `first_rows[i] + p` (each request from a page on)."""
    slots: torch.Tensor  # int64 (keys,), device: the pool slot each gathered key is read from
    rows: torch.Tensor  # int64 (keys,), device: its scratch row
    cos_sin: torch.Tensor  # (keys, rotary_dim) fp32, device: its rotation (a document's shift; none for private keys)
    scratch_rows: int
    first_rows: list[int]  # per request (batch order): the scratch row of its position 0
    local: Entries | None  # causal, one per query run, over the scratch's pages (None: `masked_local`)
    groups: list[tuple[int, int, int, int]]  # the cascade's groups: (first batch row, end row, first local key's row, its position)
    masked_local: bool  # the local keys attend as position-masked tiles of `groups` (scattered picks), not `local`
    positions: np.ndarray  # int64: every batch row's prompt position
    bulk: Entries | None  # non-causal, over the scratch's pages
    merge: MergeIndex | None  # where the bulk entries' results go


def plan_pass(linked: list, req_to_token: torch.Tensor, rope: RopeTable, device: torch.device,
              tuning: CascadeTuning = CascadeTuning()) -> GatheredPass:
    """`linked`: the batch's link passes (`attention.LinkedRows`, all extending, in batch order)."""
    page = GATHER_PAGE
    slots, rows, first_rows, positions = [], [], [], []
    shifts, turns = [np.zeros(1, dtype=np.int64)], []  # the batch's runs' shifts (row 0: none); each key's row in it
    num_shifts = 1
    local, bulk, bulk_rows, groups, base = [], [], [], [], 0  # base: the next free scratch page
    for m in linked:
        layout, shared = m.link.layout, m.link.shared
        extend = layout.extend_positions
        n = int(extend[-1]) + 1  # every key a query of the pass reads: positions [0, n) (`gathered_keys`)
        row_of = layout.row_of()[:n]
        key_slots = torch.empty(n, dtype=torch.int64, device=device)
        private = np.flatnonzero(row_of >= 0)
        key_slots[to_device(private, device)] = req_to_token[m.req_pool_idx, to_device(row_of[private], device)].long()
        turn = np.zeros(n, dtype=np.int64)
        if shared is not None:
            runs = layout.cached_runs
            reused = concat_ranges([r.start for r in runs], [r.start + r.length for r in runs])
            key_slots[to_device(reused, device)] = shared.slots.to(device, torch.int64)
            turn[reused] = np.repeat(num_shifts + np.arange(len(runs)), shared.lengths)
            shifts.append(shared.shifts.numpy())
            num_shifts += len(runs)
        first_row = base * page
        slots.append(key_slots)
        turns.append(turn)
        rows.append(np.arange(first_row, first_row + n))
        first_rows.append(first_row)
        positions.append(extend)
        seq_bulk, seq_local = attention_entries(query_runs(extend.tolist()), page, tuning)
        local += [(m.offset + q0, m.offset + q1, base + k0 // page, k1 - k0) for q0, q1, k0, k1 in seq_local]
        bulk += [(m.offset + q0, m.offset + q1, base + k0 // page, k1 - k0) for q0, q1, k0, k1 in seq_bulk]
        bulk_rows += [(m.offset + q0, m.offset + q1) for q0, q1, _, _ in seq_bulk]
        groups += [(m.offset + q0, m.offset + q1, first_row + k0, k0) for q0, q1, k0 in local_groups(seq_local)]
        base += triton.cdiv(n, page)
    masked = tuning.masks_local(len(local), len(groups))
    angles = torch.cat(rope.angles(to_device(np.concatenate(shifts), rope.cos_sin_cache.device)), -1).to(device)
    cos_sin = angles.index_select(0, to_device(np.concatenate(turns), device))  # one gather: a row a key
    return GatheredPass(torch.cat(slots), to_device(np.concatenate(rows), device), cos_sin, base * page,
                        first_rows, None if masked else paged_entries(local, page, device), groups, masked,
                        np.concatenate(positions), paged_entries(bulk, page, device) if bulk else None,
                        MergeIndex.build(bulk_rows, device) if bulk_rows else None)


def paged_entries(entries: list[tuple[int, int, int, int]], page: int, device: torch.device) -> Entries:
    """Entries (first batch row, end row, first scratch page, key count) as FlashInfer's plan takes them."""
    pages = [triton.cdiv(keys, page) for _, _, _, keys in entries]
    first = np.asarray([p for _, _, p, _ in entries], dtype=np.int64)
    return Entries(indptr([q1 - q0 for q0, q1, _, _ in entries]), indptr(pages),
                   to_device(concat_ranges(first, first + np.asarray(pages, dtype=np.int64)), device).to(torch.int32),
                   page, torch.tensor([(keys - 1) % page + 1 for _, _, _, keys in entries], dtype=torch.int32))


class GatheredWrapper:
    """Stands where SGLang's backend expects its paged-prefill wrapper: `forward` gathers the
    layer's keys and values into the scratch, then attends the local entries (or tiles) and
    merges the bulk entries' results into them."""

    def __init__(self, passes: GatheredPass, local, bulk, tiles: LocalTiles | None, rope: RopeTable):
        self.passes, self.local, self.bulk, self.tiles, self.rope = passes, local, bulk, tiles, rope
        self.positions = to_device(passes.positions, passes.rows.device) if tiles is not None else None
        self.scratch: tuple[torch.Tensor, torch.Tensor] | None = None  # made at the first layer, reused by the others

    def forward(self, q: torch.Tensor, kv_cache, causal: bool = True, **kwargs) -> torch.Tensor:
        g, (k, v) = self.passes, kv_cache
        if self.scratch is None:
            self.scratch = tuple(torch.empty((g.scratch_rows, *k.shape[1:]), dtype=k.dtype, device=k.device)
                                 for _ in range(2))
        k_scratch, v_scratch = self.scratch
        rotated_copy(self.rope, [k], [v], g.slots, g.rows, g.cos_sin, [k_scratch], [v_scratch])
        paged = tuple(t.view(-1, GATHER_PAGE, *t.shape[1:]) for t in self.scratch)
        if self.tiles is not None:
            require_plain_softmax("a gathered pass's local tiles", q.shape[-1], **kwargs)
            out, lse = local_attention(q, k_scratch, v_scratch, self.positions, self.tiles)
        else:
            out, lse = attend_with_lse(self.local, q, paged, causal=True, **kwargs)
        if g.merge is not None:
            merge_into(out, lse, *attend_with_lse(self.bulk, q.index_select(0, g.merge.query_rows), paged, **kwargs),
                       g.merge)
        return out


def plan_flashinfer(backend, passes: GatheredPass, rope: RopeTable) -> GatheredWrapper:
    """Plan the wrappers of ours (FA2 for the runs' short causal entries, as the engine; FA3
    on Hopper for the bulk) and return the backend's wrapper for the forward."""
    import flashinfer

    if getattr(backend, "epic_gathered_local", None) is None:
        backend.epic_gathered_local = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            backend.workspace_buffer, "NHD", backend="fa2")
        backend.epic_gathered_bulk = flashinfer.BatchPrefillWithPagedKVCacheWrapper(backend.workspace_buffer, "NHD")
    tiles = None
    if passes.masked_local:
        updater = backend.indices_updater_prefill
        tiles = LocalTiles.build(passes.groups, passes.positions, updater.num_qo_heads // updater.num_kv_heads,
                                 passes.rows.device)
    else:
        plan_entries(backend.epic_gathered_local, backend, passes.local, causal=True)
    if passes.bulk is not None:
        plan_entries(backend.epic_gathered_bulk, backend, passes.bulk, causal=False)
    return GatheredWrapper(passes, backend.epic_gathered_local, backend.epic_gathered_bulk, tiles, rope)
