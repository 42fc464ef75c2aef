"""querylink inside SGLang's forward: the scout, the pick, and the row planned again over the picks.

A querylink request's row holds legolink-k's tokens where its picks will go
(`link_request.py`). Entering the first decoder layer of a forward that holds querylink link
passes (the decoder-layer hook, `blend.HOOKED_LAYERS`), whatever else the batch holds:

1. scout: each one's row tokens outside the documents (the question, the text between
   documents; and the last token) through the layers up to the last scored one, the batch cut
   to those rows and slots, `ScoutWrapper` as the attention: each query attends every prompt position
   before it, the exact prefix and the scouted tokens in the row, every document token in its
   document's shared slot rotated by the document's shift (the engine's scout reads the same
   keys), and the question's attention x value norm on each key is summed
   (`scout_attention`'s Triton kernels, the engine's; their torch definition on CPU);
2. pick: the mass (summed over kv heads and tensor-parallel ranks, so every rank picks the
   same) on the host, `link_plan.querylink_pick`, the engine's rule: one wait on the GPU per
   forward, as CacheBlend's;
3. plan again: `LinkRequest.take_picks` puts the picks in the row in place of the stand-ins
   (as many: the slots SGLang allocated stay the row's), the batch's input ids and positions
   follow in place, the batch's cached runs' entries are planned again
   (`attention.plan_linked_rows`, `plan_flashinfer`), and the forward runs on from the new rows'
   embeddings. The scout's KV writes land in row slots the link pass writes again; documents
   are only read.
"""
from __future__ import annotations

import numpy as np
import torch
from sglang.srt.runtime_context import get_parallel

from epic_sglang.link_plan import querylink_pick, scout_queries
from epic_sglang.scout_attention import ScoutSeq, scored_layers, scout_layer_torch, scout_layer_triton
from epic_sglang.sglang_plugin import attention
from epic_sglang.sglang_plugin.entries import require_plain_softmax
from epic_sglang.sglang_plugin.link_request import document_tokens, to_device
from epic_sglang.sglang_plugin.rotary import RopeTable


def unread_rope(rope: RopeTable, head_dim: int) -> str | None:
    """Why the scout's kernels cannot rotate the model's keys (None: they can: rotate-half,
    neox style, over the whole head)."""
    if rope.is_neox_style and rope.rotary_dim == head_dim:
        return None
    return "the scout's kernels rotate whole heads, rotate-half style; the model's RoPE does not"


class ScoutWrapper:
    """Stands where SGLang's backend expects its paged-prefill wrapper while the scouts run:
    `forward` attends each sequence's queries (SGLang's, already rotated; rows `q_start` to
    `q_end` of the cut batch) over its keys, and adds its mass at its scored layers. `layer`:
    the layer being run, set by the caller."""

    def __init__(self, seqs: list[tuple[ScoutSeq, set[int]]]):
        self.seqs, self.layer = seqs, 0

    def forward(self, q: torch.Tensor, kv_cache, **kwargs) -> torch.Tensor:
        require_plain_softmax("querylink's scout", q.shape[-1], **kwargs)
        layer_fn = scout_layer_triton if q.is_cuda else scout_layer_torch
        out = torch.empty_like(q)
        for seq, scored in self.seqs:
            rows = slice(seq.q_start, seq.q_end)
            out[rows] = layer_fn(q[rows], kv_cache[0], kv_cache[1], seq, self.layer in scored)
        return out


def scout_seq(scout: attention.ScoutPass, rope: RopeTable, kv_heads: int, q_start: int) -> tuple[ScoutSeq, np.ndarray]:
    """A scout's sequence, its queries from row `q_start` of the cut batch on, and their rows in
    the batch: every prompt position's key (the exact prefix and the scouted tokens in the row,
    documents in their shared slots, rotated by their shift), the scouted queries at their
    positions, the question scored (the tokens after the last document; the last token if none)."""
    link, sources = scout.link, scout.link.scout
    layout, plan, device = link.layout, sources.plan, scout.row.device
    extend = layout.extend_positions
    scouted, scored = scout_queries(plan, extend)
    rows = np.flatnonzero(scouted)
    positions = extend[rows]
    n = layout.prompt_len
    row_of = layout.row_of()
    key_slots = torch.zeros(n, dtype=torch.int64, device=device)
    in_row = np.flatnonzero(row_of >= 0)
    key_slots[to_device(in_row, device)] = scout.row[to_device(row_of[in_row], device)]
    doc_positions, doc_slots, doc_shifts = document_tokens(plan, sources.doc_slots)
    read = doc_positions != n - 1  # the last token is the row's
    key_slots[to_device(doc_positions[read], device)] = doc_slots.to(device)[to_device(np.flatnonzero(read), device)]
    shifts = np.zeros(n, dtype=np.int64)
    shifts[doc_positions[read]] = doc_shifts[read]
    seq = ScoutSeq(q_start, q_start + len(rows), to_device(positions, device),
                   to_device(scored.astype(np.float32), device), None, key_slots,
                   torch.cat(rope.angles(to_device(shifts, rope.cos_sin_cache.device)), -1).to(device),
                   torch.full((1,), n, dtype=torch.int32, device=device), n,  # a fill, no copy
                   torch.zeros(kv_heads, n, dtype=torch.float32, device=device))
    return seq, scout.offset + rows


def scout_and_link(original, plan: attention.LinkAttentionPlan, positions: torch.Tensor, hidden_states: torch.Tensor,
                   forward_batch, pool, backend) -> torch.Tensor:
    """Entering the first layer of a forward with querylink link passes: their scouts together,
    the picks, the rows planned again over them. Returns the layer's input with the new rows'
    embeddings; `positions` and the batch's input ids are rewritten in place."""
    from sglang.srt.layers.attention.flashinfer_backend import PrefillMetadata

    rope, layers, device = plan.rope, plan.model.model.layers, hidden_states.device
    kv_heads, seqs, rows, start = pool.get_key_buffer(pool.start_layer).shape[1], [], [], 0
    for sp in plan.scouts:
        seq, seq_rows = scout_seq(sp, rope, kv_heads, start)
        seqs.append((seq, scored_layers(len(layers), sp.link.scout.stride)))
        rows.append(seq_rows)
        start = seq.q_end
    wrapper = ScoutWrapper(seqs)
    index = to_device(np.concatenate(rows), device)
    out_cache_loc, metadata = forward_batch.out_cache_loc, backend.forward_metadata
    forward_batch.out_cache_loc, backend.forward_metadata = out_cache_loc[index], PrefillMetadata([wrapper], False, False)
    h, residual, scout_positions = hidden_states[index], None, positions[index]
    try:
        for i in range(max(max(scored) for _, scored in seqs) + 1):
            wrapper.layer = i
            h, residual = original(layers[i], scout_positions, h, forward_batch, residual)
    finally:
        forward_batch.out_cache_loc, backend.forward_metadata = out_cache_loc, metadata
    masses = torch.cat([seq.mass.sum(0) for seq, _ in seqs])
    if get_parallel().tp_size > 1:  # each rank holds some kv heads: every rank picks over all of them
        from sglang.srt.distributed import tensor_model_parallel_all_reduce

        masses = tensor_model_parallel_all_reduce(masses)
    masses = masses.cpu()  # the wait
    changed = []
    for sp, mass in zip(plan.scouts, masses.split([seq.max_keys for seq, _ in seqs])):
        link = sp.link
        link.take_picks(sp.req, querylink_pick(mass, link.scout.plan, link.scout.block).numpy())
        ids = np.asarray(sp.req.full_untruncated_fill_ids, dtype=np.int64)[link.layout.exact_prefix_len:]
        at = slice(sp.offset, sp.offset + len(ids))
        forward_batch.input_ids[at] = to_device(ids, device)
        changed.append(np.arange(at.start, at.stop))
    plan.scouts = []
    attention.plan_linked_rows(plan, device)
    attention.apply_positions(plan, positions)
    attention.plan_flashinfer(backend, plan)
    rows = to_device(np.concatenate(changed), device)
    return hidden_states.index_copy(0, rows, plan.model.model.embed_tokens(forward_batch.input_ids[rows]))
