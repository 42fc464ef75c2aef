"""Linked requests' decode steps inside SGLang's decode CUDA graphs.

On unless `EPIC_SGLANG_DECODE_GRAPHS=0` (then a decode batch holding a linked request runs
eagerly). SGLang captures one decode graph per batch size; beside each, the `epic` variants
are captured, one per tier of `PART_TIERS` (SGLang's graph key has a variant label, as for
LoRA: `epic8`, `epic64`), and only a batch whose linked requests read shared documents
replays one, the smallest tier that holds the step: plain batches keep SGLang's own graphs,
untouched.

A graph's kernels have fixed shapes, while the shared entries (`attention.py`: in decode one
per distinct document's runs, holding the query of every request that reads them) change from
step to step.
So each `epic` graph holds `graph_slots(bs, parts)` entries over `graph_rows(bs, parts)` query rows,
always all of them (FlashInfer checks a forward's rows against its plan's; the capture plans
one entry with every request's query, so its query tiles fit a run the whole batch reads):
first the spare entry (no query, no key), then the step's entries, then padding entries of
no query over one key (slot 0, SGLang's padding slot), the last of them holding the rows the
step leaves over. FlashInfer's graph plan sizes the grid for the most tiles the rows could
make; without split-kv its spare blocks have no valid mask and run whatever entry the plan's
host tile arrays name past the step's tiles (stale, or zero): those arrays are zeroed before
each plan, so every spare block runs the spare entry (measured: at batch 32 they had run the
first real entry ~2,000 times a layer, 15 ms a step). The merge index covers every batch row
(a row without parts is rewritten with its own value). Padding is not free: each padding
row is a query rotated, attended over one key and written, in every layer, so a step replays
the smallest tier it fits. A step with more parts than the largest tier holds, or a request
reading more than its `parts` documents, runs eagerly. At capture the graph's `LinkWrapper` wraps
SGLang's graph wrapper of that batch size around static buffers; before each replay they are refilled
from the step's plan and the shared wrapper re-planned (host-side offsets: nothing waits for
the stream).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from epic_sglang.merge_states import MergeIndex, merge_arrays
from epic_sglang.sglang_plugin.attention import LinkAttentionPlan, LinkWrapper, SharedParts
from epic_sglang.sglang_plugin.entries import indptr, last_page_lens
from epic_sglang.sglang_plugin.link_request import to_device
from epic_sglang.sglang_plugin.rotary import RopeTable
from epic_sglang.sglang_plugin.tally import Tally

# Shared parts per request the `epic` graphs of a batch size hold (in decode one per document a
# request reads), one graph per tier: a RAG prompt of a few documents replays the small one (8x
# fewer padding rows at 8 documents), a 32K prompt of 63 the large one.
PART_TIERS = (8, 64)
MAX_ENTRIES = 4096  # shared parts per graph: the padding's cost is one rotated query row each
VARIANT = "epic"  # the label prefix of the linked graphs in SGLang's graph keys

STEPS = Tally("decode steps over shared documents")  # each tier's graph label, or "eager"


def enabled() -> bool:
    return os.environ.get("EPIC_SGLANG_DECODE_GRAPHS", "1") != "0"


def needs_variant(plan: LinkAttentionPlan | None) -> bool:
    """Whether a decode step needs an `epic` graph (shared runs to attend): a linked request
    whose documents were all computed needs only its positions, which SGLang's graph takes."""
    return plan is not None and plan.shared is not None


def variant(parts: int) -> str:
    """The graph key label of the `epic` graphs of tier `parts`."""
    return f"{VARIANT}{parts}"


def graph_entries(bs: int, parts: int) -> int:
    return min(bs * parts, MAX_ENTRIES)


def runs_in_graph(plan: LinkAttentionPlan | None, bs: int, lora_variants: bool = False) -> bool:
    """Whether a decode step of `bs` requests can replay a graph: SGLang's own, or an `epic`
    one when they are captured (on, and SGLang has no LoRA variants of its own) and the step fits one."""
    return not needs_variant(plan) or (enabled() and not lora_variants and graph_parts(plan, bs) is not None)


def graph_parts(plan: LinkAttentionPlan, bs: int) -> int | None:
    """The smallest tier whose graph of `bs` requests holds the decode step (None: none does).
    `bs` is the step's own size (`plan.batch_size`), not the captured size SGLang pads it to,
    so the choice made to run the graph and the graph refilled agree."""
    return next((parts for parts in PART_TIERS if fits(plan, bs, parts)), None)


def fits(plan: LinkAttentionPlan, bs: int, parts: int) -> bool:
    """Whether a decode step of `bs` requests fits the `epic` graph of tier `parts` (its shared
    parts, one query row each, at most the graph's entries; no request over `parts`)."""
    return len(plan.shared.spans) <= graph_entries(bs, parts) and plan.shared.merge.most_parts <= parts


@dataclass(frozen=True)
class PaddedEntries:
    """Host arrays of a graph's shared entries for one step (see the module docstring)."""
    qo_indptr: np.ndarray  # int32 (entries + 1,)
    kv_indptr: np.ndarray  # int32 (entries + 1,)
    query_rows: np.ndarray  # int64 (rows,): the batch row each gathered query comes from
    part_ptr: np.ndarray  # int32 (bs + 1,): batch row r's parts are part_idx[part_ptr[r]:part_ptr[r + 1]]
    part_idx: np.ndarray  # int32 (rows,)
    real: int  # gathered rows [0, real) are the step's parts

    @classmethod
    def of(cls, parts: SharedParts, bs: int, tier: int) -> PaddedEntries:
        """A step's parts (one query each), then padding, in the graph of tier `tier`."""
        if any(b - a != 1 for a, b in parts.spans):
            raise ValueError("a decode step's shared parts have one query each")
        real, used, entries = len(parts.spans), len(parts.entries.qo_indptr) - 1, graph_slots(bs, tier)
        rows = graph_rows(bs, tier)
        query_rows, _, part_ptr, part_idx, _ = merge_arrays(parts.spans, bs)  # the eager merge's order
        kv_lens = np.diff(parts.entries.kv_indptr.numpy())
        pad_rows = np.zeros(rows - real, dtype=np.int64)
        pad = entries - 1 - used
        qo_indptr = np.concatenate([[0], parts.entries.qo_indptr.numpy(), np.full(pad, real)])
        qo_indptr[-1] = rows
        return cls(qo_indptr.astype(np.int32),
                   indptr_of(np.concatenate([[0], kv_lens, np.ones(pad, dtype=np.int64)])),
                   np.concatenate([query_rows, pad_rows]), part_ptr,
                   np.concatenate([part_idx, pad_rows]).astype(np.int32), real)

    @classmethod
    def for_capture(cls, bs: int, tier: int) -> PaddedEntries:
        """The capture's plan: the most query rows (FlashInfer's graph plan keeps that bound),
        all of batch row 0's, merged nowhere."""
        rows, entries = graph_rows(bs, tier), graph_slots(bs, tier)
        qo_lens = np.concatenate([[0, rows - entries + 2], np.ones(entries - 2, dtype=np.int64)])
        kv_lens = np.concatenate([[0], np.ones(entries - 1, dtype=np.int64)])  # the spare entry has no key
        return cls(indptr_of(qo_lens), indptr_of(kv_lens), np.zeros(rows, dtype=np.int64),
                   np.zeros(bs + 1, dtype=np.int32), np.zeros(rows, dtype=np.int32), 0)


def indptr_of(lens: np.ndarray) -> np.ndarray:
    return indptr(lens).numpy()


def graph_slots(bs: int, parts: int) -> int:
    """Entries a graph plans: the spare entry, room for every part's own entry, the padding entry."""
    return graph_entries(bs, parts) + 2


def graph_rows(bs: int, parts: int) -> int:
    return graph_entries(bs, parts) + bs


class DecodeGraph:
    """One captured batch size and tier's shared entries: static buffers and a cuda-graph paged
    prefill wrapper (FA2: FlashInfer's graph-safe prefill kernels), planned for the capture."""

    def __init__(self, backend, bs: int, parts: int, rope: RopeTable, kv_indices: torch.Tensor):
        import flashinfer

        self.bs, self.parts, self.entries, self.rope = bs, parts, graph_slots(bs, parts), rope
        rows, device = graph_rows(bs, parts), kv_indices.device
        self.cos_sin = torch.zeros(rows, rope.rotary_dim, dtype=torch.float32, device=device)
        self.merge = MergeIndex(query_rows=torch.zeros(rows, dtype=torch.int64, device=device),
                                rows=torch.arange(bs, dtype=torch.int32, device=device),
                                part_ptr=torch.zeros(bs + 1, dtype=torch.int32, device=device),
                                part_idx=torch.zeros(rows, dtype=torch.int32, device=device),
                                most_parts=parts)
        self.kv_indices = kv_indices  # shared by every batch size's graph (one replays at a time)
        self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            backend.workspace_buffer, "NHD", use_cuda_graph=True, backend="fa2",
            qo_indptr_buf=torch.zeros(self.entries + 1, dtype=torch.int32, device=device),
            paged_kv_indptr_buf=torch.zeros(self.entries + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buf=kv_indices,
            paged_kv_last_page_len_buf=torch.ones(self.entries, dtype=torch.int32, device=device))
        self.tile_bytes = self.wrapper._pin_memory_int_workspace_buffer.numel()  # all of it, once
        self._plan(backend, PaddedEntries.for_capture(bs, parts), None)
        info = [int(x) for x in self.wrapper._plan_info]  # FlashInfer's PrefillPlanInfo::ToVector
        padded_tiles, tile_offsets = info[0], info[4:7]  # request, q tile and kv tile indices
        self.tile_bytes = max(tile_offsets) + 4 * padded_tiles

    def link_wrapper(self, own) -> LinkWrapper:
        """What the captured forward calls: SGLang's graph wrapper and these entries."""
        return LinkWrapper(own, self.wrapper, self.cos_sin, self.merge, self.rope)

    def fill(self, backend, plan: LinkAttentionPlan) -> None:
        """The step's shared entries into the static buffers (stream-ordered copies), then plan."""
        self._plan(backend, PaddedEntries.of(plan.shared, self.bs, self.parts), plan.shared)

    def _plan(self, backend, padded: PaddedEntries, parts: SharedParts | None) -> None:
        device = self.cos_sin.device

        def put(dst: torch.Tensor, src: np.ndarray) -> None:
            dst.copy_(to_device(src, device), non_blocking=True)

        put(self.merge.query_rows, padded.query_rows)
        put(self.merge.part_ptr, padded.part_ptr)
        put(self.merge.part_idx, padded.part_idx)
        indices = torch.zeros(int(padded.kv_indptr[-1]), dtype=torch.int32, device=device)  # padding reads slot 0
        if parts is not None:
            self.cos_sin[:padded.real].copy_(parts.cos_sin, non_blocking=True)
            indices[:parts.entries.kv_indices.numel()] = parts.entries.kv_indices
        self.wrapper._pin_memory_int_workspace_buffer[:self.tile_bytes].zero_()  # spare blocks: the spare entry
        updater = backend.indices_updater_prefill
        # no split-kv: the entries fill the GPU, and a split's scratch for thousands of them
        # would overflow the workspace the backend shares
        self.wrapper.begin_forward(torch.from_numpy(padded.qo_indptr), torch.from_numpy(padded.kv_indptr), indices,
                                   last_page_lens(self.entries), updater.num_qo_heads, updater.num_kv_heads,
                                   updater.head_dim, 1, q_data_type=updater.q_data_type,
                                   kv_data_type=updater.data_type, non_blocking=True, causal=False,
                                   disable_split_kv=True)


def captured(backend, bs: int, parts: int, rope: RopeTable) -> DecodeGraph:
    """The graph of batch size `bs` and tier `parts`, made at its capture; one key buffer for
    all (SGLang captures the largest batch size first; one graph replays at a time)."""
    graphs = backend.__dict__.setdefault("epic_decode_graphs", {})
    # every request's keys + the spare and padding entries of the largest tier, so one buffer serves every tier
    need = bs * backend.max_context_len + graph_slots(bs, max(PART_TIERS))
    keys = next((g.kv_indices for g in graphs.values() if g.kv_indices.numel() >= need), None)
    if keys is None:
        keys = torch.zeros(need, dtype=torch.int32, device=backend.workspace_buffer.device)
    graphs[bs, parts] = DecodeGraph(backend, bs, parts, rope, keys)
    return graphs[bs, parts]
