"""The link pass's attention on SGLang's FlashInfer backend, planned once per forward.

A linked request's computed runs (see `layout.py`) attend as the engine's `auto` link mode
does (`epic_sglang.attention.flashinfer_backend`), with the same entries
(`epic_sglang.link_plan`): a long link as a cascade (runs grouped to `CascadeTuning.group`
queries share one non-causal bulk entry over the keys before the group, each key read once
per group, not once per run, in `chunk`-key pieces; each run keeps a
causal local entry from there to its end; the partial results merge by log-sum-exp, one
kernel, `epic_sglang.merge_states`), a short one as one causal
entry per run (`wants_cascade`). Other requests of the batch are one causal entry each.
Keys are KV pool slots (page size 1) read through the request's row, so nothing is gathered.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from epic_sglang.link_plan import CascadeTuning, attention_entries, wants_cascade
from epic_sglang.merge_states import MergeIndex, merge_into
from epic_sglang.sglang_plugin.link_request import LinkRequest


@dataclass
class Entries:
    """One paged-prefill wrapper's plan: query rows and pool slots of every entry (an
    entry's own queries are its last keys: causal alignment is bottom-right)."""
    qo_indptr: torch.Tensor  # int32, device
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor


@dataclass
class LinkAttentionPlan:
    local: Entries
    bulk: Entries | None  # None: no linked request has keys before its runs' groups
    merge: MergeIndex | None  # the batch's query rows each bulk entry holds
    positions: dict[int, torch.Tensor]  # batch token offset -> positions of a linked request's extend


@dataclass
class _EntryList:
    pool_rows: list[np.ndarray] = field(default_factory=list)
    kv_rows: list[np.ndarray] = field(default_factory=list)
    qo_lens: list[int] = field(default_factory=list)

    def add(self, req_pool_idx: int, rows: np.ndarray, queries: int) -> None:
        """An entry of `queries` queries over the request's row slots `rows`."""
        self.pool_rows.append(np.full(len(rows), req_pool_idx, dtype=np.int64))
        self.kv_rows.append(np.asarray(rows, dtype=np.int64))
        self.qo_lens.append(queries)

    def build(self, req_to_token: torch.Tensor, device) -> Entries | None:
        if not self.qo_lens:
            return None
        kv_indices = req_to_token[torch.from_numpy(np.concatenate(self.pool_rows)).to(device),
                                  torch.from_numpy(np.concatenate(self.kv_rows)).to(device)].to(torch.int32)
        return Entries(_indptr(self.qo_lens, device), _indptr([len(r) for r in self.kv_rows], device), kv_indices)


def _indptr(lens: list[int], device) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)).to(device)


def build_plan(batch, links: dict[int, LinkRequest], tuning: CascadeTuning = CascadeTuning()) -> LinkAttentionPlan:
    """`batch`: a SGLang ScheduleBatch in extend mode; `links`: its linked requests by index."""
    local, bulk, bulk_rows, positions = _EntryList(), _EntryList(), [], {}
    offset = 0
    for i, req in enumerate(batch.reqs):
        extend_len = batch.extend_lens[i]
        link = links.get(i)
        if link is None:
            local.add(req.req_pool_idx, np.arange(int(batch.seq_lens_cpu[i])), extend_len)
        else:
            layout = link.layout
            row_of = layout.row_of()  # prompt position -> row slot
            runs = layout.query_runs()
            group_entries, run_entries = attention_entries(runs, 1, tuning if wants_cascade(runs, tuning) else None)
            for q0, q1, k0, k1 in run_entries:
                local.add(req.req_pool_idx, row_of[k0:k1], q1 - q0)
            for q0, q1, k0, k1 in group_entries:
                bulk.add(req.req_pool_idx, row_of[k0:k1], q1 - q0)
                bulk_rows.append((offset + q0, offset + q1))
            positions[offset] = torch.from_numpy(layout.extend_positions)
        offset += extend_len
    req_to_token, device = batch.req_to_token_pool.req_to_token, batch.device
    return LinkAttentionPlan(local.build(req_to_token, device), bulk.build(req_to_token, device),
                             MergeIndex.build(bulk_rows, device) if bulk_rows else None, positions)


def apply_positions(plan: LinkAttentionPlan, positions: torch.Tensor) -> None:
    """Prompt positions for the linked requests' new tokens (SGLang numbered them as if
    they followed their prefix in the row)."""
    for offset, pos in plan.positions.items():
        positions[offset:offset + len(pos)] = pos.to(positions.device, positions.dtype, non_blocking=True)


class CascadeWrapper:
    """Stands where SGLang's backend expects its paged-prefill wrapper: `forward` attends
    the local entries and the bulk entries (for the rows that have one) and merges them."""

    def __init__(self, local, bulk, merge: MergeIndex):
        self.local, self.bulk, self.merge = local, bulk, merge

    def forward(self, q: torch.Tensor, kv_cache, **kwargs) -> torch.Tensor:
        out, lse = self.local.forward_return_lse(q, kv_cache, **kwargs)
        bulk = self.bulk.forward_return_lse(q[self.merge.query_rows], kv_cache, **{**kwargs, "causal": False})
        merge_into(out, lse, *bulk, self.merge)
        return out


def plan_flashinfer(backend, plan: LinkAttentionPlan) -> None:
    """Plan the backend's paged prefill wrapper with the local entries (no ragged pass:
    SGLang then writes the new KV before attending, so entries see each other's runs) and,
    when there are bulk entries, a second wrapper of ours (FlashInfer picks FA3 on Hopper)."""
    from sglang.srt.layers.attention.flashinfer_backend import PrefillMetadata

    if backend.num_wrappers != 1:
        raise NotImplementedError("epic: linking needs a model without sliding-window or cross attention")
    wrapper = backend.prefill_wrappers_paged[0]
    _plan(wrapper, backend, plan.local)
    if plan.bulk is None:
        backend.forward_metadata = PrefillMetadata(backend.prefill_wrappers_paged, False, False)
        return
    bulk = getattr(backend, "epic_bulk_wrapper", None)
    if bulk is None:
        import flashinfer

        bulk = backend.epic_bulk_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(backend.workspace_buffer, "NHD")
    _plan(bulk, backend, plan.bulk, causal=False)
    backend.forward_metadata = PrefillMetadata([CascadeWrapper(wrapper, bulk, plan.merge)], False, False)


def _plan(wrapper, backend, entries: Entries, **kwargs) -> None:
    updater = backend.indices_updater_prefill
    count = len(entries.qo_indptr) - 1
    wrapper.begin_forward(entries.qo_indptr, entries.kv_indptr, entries.kv_indices,
                          torch.ones(count, dtype=torch.int32, device=entries.kv_indices.device),
                          updater.num_qo_heads, updater.num_kv_heads, updater.head_dim, 1,
                          q_data_type=updater.q_data_type, kv_data_type=updater.data_type, non_blocking=True, **kwargs)
