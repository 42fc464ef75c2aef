"""querylink inside SGLang's forward: the scout, the pick, and the row planned again over the picks.

A querylink request's row holds legolink-k's tokens where its picks will go
(`link_request.py`), and its link pass runs alone in its batch (as CacheBlend's). Entering
its first decoder layer (the decoder-layer hook, `blend.HOOKED_LAYERS`):

1. scout: the row's tokens outside the documents (the question, the text between documents;
   and the last token) through the layers up to the last scored one, the batch cut to their
   rows and slots, `ScoutWrapper` as the attention: each query attends every prompt position
   before it, the exact prefix and the scouted tokens in the row, every document token in its
   document's shared slot rotated by the document's shift (the engine's scout reads the same
   keys), and the question's attention x value norm on each key is summed
   (`scout_attention`'s Triton kernels, the engine's; their torch definition on CPU);
2. pick: the mass (summed over kv heads and tensor-parallel ranks, so every rank picks the
   same) on the host, `link_plan.querylink_pick`, the engine's rule: one wait on the GPU per
   link pass, as CacheBlend's;
3. plan again: `LinkRequest.take_picks` puts the picks in the row in place of the stand-ins
   (as many: the slots SGLang allocated stay the row's), the batch's input ids and positions
   follow in place, the cached runs' attention entries are planned again
   (`attention.plan_flashinfer`), and the link pass runs from the new row's embeddings. The
   scout's KV writes land in row slots the link pass writes again; documents are only read.
"""
from __future__ import annotations

import numpy as np
import torch
from sglang.srt.runtime_context import get_parallel

from epic_sglang.link_plan import querylink_pick
from epic_sglang.scout_attention import ScoutSeq, scored_layers, scout_layer_torch, scout_layer_triton
from epic_sglang.sglang_plugin import attention
from epic_sglang.sglang_plugin.link_request import document_tokens, to_device
from epic_sglang.sglang_plugin.rotary import RopeTable


def reads_rope(rope: RopeTable, head_dim: int) -> bool:
    """Whether the scout's kernels can rotate the model's keys: rotate-half (neox) style over
    the whole head."""
    return rope.is_neox_style and rope.rotary_dim == head_dim


class ScoutWrapper:
    """Stands where SGLang's backend expects its paged-prefill wrapper while the scout runs:
    `forward` attends the scouted queries (SGLang's, already rotated) over `seq`'s keys and adds
    the mass at the scored layers. `layer`: the layer being run, set by the caller."""

    def __init__(self, seq: ScoutSeq, scored: set[int]):
        self.seq, self.scored, self.layer = seq, scored, 0

    def forward(self, q: torch.Tensor, kv_cache, sm_scale: float | None = None, logits_soft_cap: float | None = None,
                **kwargs) -> torch.Tensor:
        dim = q.shape[-1]
        if (sm_scale is not None and abs(sm_scale * dim ** 0.5 - 1) > 1e-6) or logits_soft_cap:
            raise NotImplementedError("epic: querylink's scout needs attention scaled by head_dim ** -0.5, no soft cap")
        layer_fn = scout_layer_triton if q.is_cuda else scout_layer_torch
        return layer_fn(q, kv_cache[0], kv_cache[1], self.seq, self.layer in self.scored)


def scout_seq(scout: attention.ScoutPass, rope: RopeTable, kv_heads: int) -> tuple[ScoutSeq, np.ndarray]:
    """The scout's sequence and its rows in the batch: every prompt position's key (the exact
    prefix and the scouted tokens in the row, documents in their shared slots, rotated by
    their shift), the scouted queries at their positions, the question scored (the tokens
    after the last document; the last token if none)."""
    link, sources = scout.link, scout.link.scout
    layout, plan, device = link.layout, sources.plan, scout.row.device
    docs = plan.document_mask().numpy()
    extend = layout.extend_positions
    scouted = ~docs[extend]
    scouted[-1] = True  # the last token, even inside a document
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
    tail = int(doc_positions[-1]) + 1
    scored = positions >= tail
    if not scored.any():
        scored[-1] = True
    seq = ScoutSeq(0, len(rows), to_device(positions, device), to_device(scored.astype(np.float32), device), None,
                   key_slots, torch.cat(rope.angles(to_device(shifts, rope.cos_sin_cache.device)), -1).to(device),
                   torch.tensor([n], dtype=torch.int32, device=device), n,
                   torch.zeros(kv_heads, n, dtype=torch.float32, device=device))
    return seq, rows


def scout_and_link(original, plan: attention.LinkAttentionPlan, positions: torch.Tensor, hidden_states: torch.Tensor,
                   forward_batch, pool, backend) -> torch.Tensor:
    """Entering the first layer of a querylink link pass: scout, pick, plan the row again over
    the picks. Returns the new row's embeddings (the layer's input); `positions` and the
    batch's input ids are rewritten in place."""
    from sglang.srt.layers.attention.flashinfer_backend import PrefillMetadata

    scout, rope = plan.scout, plan.rope
    layers = scout.model.model.layers
    seq, rows = scout_seq(scout, rope, pool.get_key_buffer(pool.start_layer).shape[1])
    wrapper = ScoutWrapper(seq, scored_layers(len(layers), scout.link.scout.stride))
    index = to_device(rows, hidden_states.device)
    out_cache_loc, metadata = forward_batch.out_cache_loc, backend.forward_metadata
    forward_batch.out_cache_loc, backend.forward_metadata = out_cache_loc[index], PrefillMetadata([wrapper], False, False)
    h, residual, scout_positions = hidden_states[index], None, positions[index]
    try:
        for i in range(max(wrapper.scored) + 1):
            wrapper.layer = i
            h, residual = original(layers[i], scout_positions, h, forward_batch, residual)
    finally:
        forward_batch.out_cache_loc, backend.forward_metadata = out_cache_loc, metadata
    mass = seq.mass.sum(0)
    if get_parallel().tp_size > 1:  # each rank holds some kv heads: every rank picks over all of them
        from sglang.srt.distributed import tensor_model_parallel_all_reduce

        mass = tensor_model_parallel_all_reduce(mass)
    link = scout.link
    link.take_picks(scout.req, querylink_pick(mass, link.scout.plan, link.scout.block).numpy())  # the wait
    attention.plan_picks(plan, scout.row.device)
    attention.plan_flashinfer(backend, plan)
    positions.copy_(to_device(link.layout.extend_positions, positions.device))
    ids = np.asarray(scout.req.full_untruncated_fill_ids, dtype=np.int64)[link.layout.exact_prefix_len:]
    forward_batch.input_ids.copy_(to_device(ids, positions.device))
    return scout.model.model.embed_tokens(forward_batch.input_ids)
