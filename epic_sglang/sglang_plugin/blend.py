"""CacheBlend inside SGLang's forward: the check layer picks, the layers after it compute the picks.

A CacheBlend request's row holds its whole prompt (`link_request.py`), so up to the check
layer (`CACHEBLEND_CHECK_LAYER`) SGLang's own extend computes every token. Entering the next
layer (a hook on the decoder layers' forward, `HOOKED_LAYERS`):

1. pick: each cached document token's fresh K and V at the check layer against its
   document's (the cached key rotated forward by the document's shift, `rotary.py`); the
   `share_count` that deviate most join every token outside the documents and the last
   (`link_plan.cacheblend_pick`: the engine's rule);
2. the unpicked document tokens' KV of every later layer is copied from their documents'
   slots into the request's row, keys rotated by the shift (`rotary.rotated_copy`, one launch
   for all layers): the documents are only read;
3. the batch is cut to the picks: hidden states, residual, positions, the slots the layers
   write (`out_cache_loc`), and the attention plan: the picks' query runs over the row by
   `link_plan.attention_entries` (the engine's cascade: per group of runs a non-causal bulk
   entry, per run a causal local entry, merged by log-sum-exp).

After the last layer the hidden states take the batch's full shape again (rows cut away are
zero; SGLang's logits read each request's last token, which is always computed) and
`out_cache_loc` is given back. The pick needs the deviations on the host: one wait on the
GPU per link pass, as in the engine. Under tensor parallelism the deviations are summed over
the ranks' heads first, so every rank cuts the same tokens. A CacheBlend link pass runs alone
in its batch.
"""
from __future__ import annotations

import numpy as np
import torch
from sglang.srt.runtime_context import get_parallel

from epic_sglang.link_plan import CascadeTuning, attention_entries, cacheblend_pick, concat_ranges, query_runs
from epic_sglang.merge_states import MergeIndex
from epic_sglang.policies import CACHEBLEND_CHECK_LAYER
from epic_sglang.sglang_plugin.attention import BlendPass, LinkWrapper
from epic_sglang.sglang_plugin.entries import Entries, indptr, plan_entries
from epic_sglang.sglang_plugin.link_request import to_device
from epic_sglang.sglang_plugin.rotary import RopeTable, rotated_copy

HOOKED_LAYERS = ("sglang.srt.models.llama.LlamaDecoderLayer", "sglang.srt.models.qwen2.Qwen2DecoderLayer")


def supports(model: torch.nn.Module) -> bool:
    """Whether `model`'s decoder layers run through `blend_layer`: their class's forward is a
    hooked one (a subclass that overrides it is not)."""
    import importlib

    hooked = {getattr(importlib.import_module(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]).forward
              for path in HOOKED_LAYERS}
    return any(type(m).forward in hooked for m in model.modules())


def picked_positions(blend: BlendPass, pool, rope: RopeTable) -> np.ndarray:
    """Sorted prompt positions computed past the check layer (its KV is in the pool): the
    picks and every token outside the documents, from the first computed one (the exact
    prefix is the tree's)."""
    src, layer = blend.sources, CACHEBLEND_CHECK_LAYER
    k, v = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
    fresh, cached = blend.row[to_device(src.positions, blend.row.device)], src.slots
    cos, sin = rope.angles(to_device(src.shifts, k.device))
    dk = k[fresh].float() - rope.rotate(k[cached].float(), cos, sin)
    dv = v[fresh].float() - v[cached].float()
    deviation = dk.pow(2).sum((1, 2)) + dv.pow(2).sum((1, 2))
    if get_parallel().tp_size > 1:  # each rank holds some heads: every rank picks over all of them
        from sglang.srt.distributed import tensor_model_parallel_all_reduce

        deviation = tensor_model_parallel_all_reduce(deviation)
    recompute = src.always.copy()
    recompute[src.positions[cacheblend_pick(deviation.cpu(), src.ratio).numpy()]] = True  # the wait
    return np.flatnonzero(recompute[blend.extend_start:]) + blend.extend_start


def last_layer(pool) -> int:
    """The pool's last layer: SGLang's server sets `end_layer` one past it, its default one
    layer_num - 1 (the count of its per-layer buffers is the same in both)."""
    return pool.start_layer + len(pool.k_buffer) - 1


def copy_unpicked(blend: BlendPass, pool, rope: RopeTable, picked: np.ndarray) -> None:
    """The unpicked document tokens' KV of every layer past the check one, into the row."""
    src = blend.sources
    unpicked = ~np.isin(src.positions, picked)
    device = blend.row.device
    shifts = to_device(src.shifts[unpicked], device)
    layers = range(CACHEBLEND_CHECK_LAYER + 1, last_layer(pool) + 1)
    rotated_copy(rope, [pool.get_key_buffer(i) for i in layers], [pool.get_value_buffer(i) for i in layers],
                 src.slots[to_device(np.flatnonzero(unpicked), device)],
                 blend.row[to_device(src.positions[unpicked], device)], torch.cat(rope.angles(shifts), -1))


def cut_plan(blend: BlendPass, picked: np.ndarray, tuning: CascadeTuning = CascadeTuning()
             ) -> tuple[Entries, Entries | None, list[tuple[int, int]]]:
    """(local entries, bulk entries or None, the bulk entries' query rows) of the picks (the
    cut batch's rows, in order) over the request's row: each query sees the keys at or before
    its position."""
    bulk, local = attention_entries(query_runs(picked.tolist()), 1, tuning)
    row = blend.row

    def entries(parts) -> Entries:
        keys = concat_ranges([k0 for _, _, k0, _ in parts], [k1 for _, _, _, k1 in parts])  # positions = row indices
        return Entries(indptr([q1 - q0 for q0, q1, _, _ in parts]), indptr([k1 - k0 for _, _, k0, k1 in parts]),
                       row[to_device(keys, row.device)].to(torch.int32))

    return entries(local), (entries(bulk) if bulk else None), [(q0, q1) for q0, q1, _, _ in bulk]


def cut(blend: BlendPass, forward_batch, pool, rope: RopeTable) -> None:
    """Entering the first layer past the check one: pick, copy, and cut the batch."""
    from sglang.srt.model_executor.forward_context import get_attn_backend

    picked = picked_positions(blend, pool, rope)
    copy_unpicked(blend, pool, rope, picked)
    device = blend.row.device
    blend.keep = to_device(picked - blend.extend_start, device)  # alone in its batch: row = position - extend start
    blend.positions = to_device(picked, device)
    blend.out_cache_loc = forward_batch.out_cache_loc
    forward_batch.out_cache_loc = blend.out_cache_loc[blend.keep]
    plan_cut(get_attn_backend(), *cut_plan(blend, picked), rope)


def plan_cut(backend, local: Entries, bulk: Entries | None, spans: list[tuple[int, int]], rope: RopeTable) -> None:
    """The backend's metadata for the cut layers: the local entries (causal), the bulk ones
    (non-causal) merged into them. Wrappers of their own: the backend's still hold the first
    layers' plan."""
    import flashinfer
    from sglang.srt.layers.attention.flashinfer_backend import PrefillMetadata

    if getattr(backend, "epic_blend_local", None) is None:
        backend.epic_blend_local = flashinfer.BatchPrefillWithPagedKVCacheWrapper(backend.workspace_buffer, "NHD")
        backend.epic_blend_bulk = flashinfer.BatchPrefillWithPagedKVCacheWrapper(backend.workspace_buffer, "NHD")
    own = backend.epic_blend_local
    plan_entries(own, backend, local, causal=True)
    if bulk is not None:
        plan_entries(backend.epic_blend_bulk, backend, bulk, causal=False)
        own = LinkWrapper(own, backend.epic_blend_bulk, None, MergeIndex.build(spans, local.kv_indices.device), rope)
    backend.forward_metadata = PrefillMetadata([own], False, False)


def blend_layer(original, layer, positions, hidden_states, forward_batch, residual, *args, **kwargs):
    """A decoder layer's forward (SGLang: `layer(positions, hidden_states, forward_batch,
    residual)`): past the check layer of a CacheBlend link pass, over the picks only."""
    from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

    plan = getattr(forward_batch, "epic_plan", None)
    blend = plan.blend if plan is not None else None
    layer_id = layer.self_attn.attn.layer_id if blend is not None else -1  # every forward passes here
    if layer_id <= CACHEBLEND_CHECK_LAYER:
        return original(layer, positions, hidden_states, forward_batch, residual, *args, **kwargs)
    pool = get_token_to_kv_pool()
    if layer_id == CACHEBLEND_CHECK_LAYER + 1:
        cut(blend, forward_batch, pool, plan.rope)
        hidden_states, residual = hidden_states[blend.keep], residual[blend.keep]
    hidden_states, residual = original(layer, blend.positions, hidden_states, forward_batch, residual, *args, **kwargs)
    if layer_id == last_layer(pool):
        rows = blend.out_cache_loc.numel()
        forward_batch.out_cache_loc = blend.out_cache_loc
        hidden_states = hidden_states.new_zeros(rows, hidden_states.shape[-1]).index_copy_(0, blend.keep, hidden_states)
        residual = residual.new_zeros(rows, residual.shape[-1]).index_copy_(0, blend.keep, residual)
    return hidden_states, residual
