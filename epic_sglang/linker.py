"""The forward passes of compile and link, on one model, pool and attention backend.

- `run`: every token of the batch through every layer (compile, fr, naive, legolink, decode)
  together in one ragged batch.
- `run_cacheblend`: CacheBlend's selective pass; layers up to the check layer for all
  tokens, then only the picked tokens, reusing cached KV for the rest.
- `run_scout`: querylink's scout; the question (the prompt's non-document tokens) through
  the layers over the documents' cached KV, measuring what its attention takes from each
  document token (`attention_mass`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from epic_sglang.forward_batch import ForwardBatch
from epic_sglang.kv_pool import KVPool
from epic_sglang.link_plan import cacheblend_pick
from epic_sglang.models.decoder import CausalLM
from epic_sglang.models.rope import Rotary, apply_rotation
from epic_sglang.policies import CACHEBLEND_CHECK_LAYER


@dataclass
class BlendSeq:
    """One cacheblend request: its whole prompt, all in private slots, plus where each
    reused document position's cached KV lives."""
    input_ids: torch.Tensor  # (n,)
    slots: torch.Tensor  # (n,) private slots, the request's row
    always: torch.Tensor  # (n,) bool: positions recomputed regardless (non-document)
    doc_positions: torch.Tensor  # (d,) positions inside reused documents
    doc_slots: torch.Tensor  # (d,) their cached slots
    ratio: float


@dataclass
class ScoutQueries:
    """One sequence's scout queries and what scoring them needs at every layer, made once
    per scout (no host round trip inside the layer loop). Keys' rotations in the layout of
    the backend that scores them: the Triton kernels' angles on CUDA, cos/sin and the mask
    for torch."""
    rows: torch.Tensor  # (nq,) indices into the batch
    positions: torch.Tensor  # (nq,) their positions
    q_rope: tuple[torch.Tensor, torch.Tensor]  # the queries' cos, sin
    key_angles: torch.Tensor | None  # CUDA: (n, head_dim) fp32 [cos | sin] of positions 0..n-1
    k_rope: tuple[torch.Tensor, torch.Tensor] | None  # torch: cos, sin of positions 0..n-1
    first: int  # the first query's position: only keys from here on can be hidden from a query
    hidden: torch.Tensor | None  # torch: (nq, n - first) bool: key first + j is after query i

    @classmethod
    def build(cls, rows: torch.Tensor, positions: list[int], n: int, rotary: Rotary) -> "ScoutQueries":
        device = rows.device
        pos, keys, first = torch.tensor(positions, device=device), torch.arange(n, device=device), min(positions)
        if device.type == "cuda":
            return cls(rows, pos, rotary.cos_sin(pos, torch.float32), rotary.angles(keys), None, first, None)
        return cls(rows, pos, rotary.cos_sin(pos, torch.float32), None, rotary.cos_sin(keys, torch.float32),
                   first, torch.arange(first, n, device=device)[None, :] > pos[:, None])


def attention_mass(q: torch.Tensor, key_buffer: torch.Tensor, value_buffer: torch.Tensor, slots: torch.Tensor,
                   sq: ScoutQueries) -> torch.Tensor:
    """(n,) fp32: how much of the output of the queries `q` (nq, heads, head_dim), un-rotated,
    comes from each of the keys of positions 0..n-1 (at `slots` of the pool's buffers,
    un-rotated): the softmax attention probability under the link mask (key j visible to
    query i iff j <= pos_i) times the norm of key j's value, summed over queries and heads.
    Weighting by the value skips attention sinks (much attention, near-zero values). On CUDA
    two Triton kernels (`epic_sglang.scout_mass`); in torch logits in the pool's dtype,
    softmax and sums in fp32."""
    if q.is_cuda:
        from epic_sglang.scout_mass import attention_mass_triton

        q = apply_rotation(q, *sq.q_rope)
        return attention_mass_triton(q, sq.positions, key_buffer, value_buffer, slots, sq.key_angles)
    keys, values = key_buffer[slots], value_buffer[slots]
    n, kv_heads, dim = keys.shape
    q = apply_rotation(q * dim ** -0.5, *sq.q_rope)
    k = apply_rotation(keys, *sq.k_rope)
    q = q.view(q.shape[0], kv_heads, -1, dim).permute(1, 2, 0, 3)  # (kv, group, nq, d)
    logits = torch.matmul(q, k.permute(1, 2, 0).unsqueeze(1))  # (kv, group, nq, n)
    logits[..., sq.first:].masked_fill_(sq.hidden, float("-inf"))
    probs = torch.softmax(logits, -1, dtype=torch.float32)
    return (probs.sum((1, 2)) * values.float().norm(dim=-1).T).sum(0)


class Linker:
    def __init__(self, model: CausalLM, pool: KVPool, attn):
        self.model, self.pool, self.attn = model, pool, attn
        self.rotary = Rotary(model.config, pool.get_key_buffer(0).device)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Returns the last layer's hidden states at `rows` of the batch, by default the
        last query of every sequence; `model.logits` turns them into logits."""
        self.attn.plan(batch)
        hidden = self.model.forward(batch, self.pool, self.attn)
        return hidden[batch.last_token_index() if rows is None else rows]

    @torch.inference_mode()
    def run_scout(self, batch: ForwardBatch, stride: int, queries: list[ScoutQueries]) -> list[torch.Tensor]:
        """Per sequence, `attention_mass` of its queries on each of its positions, summed over
        every `stride`-th layer (0, s, 2s, ...) of `scout_layers`."""
        mass = [torch.zeros(s.kv_slots.numel(), device=batch.input_ids.device) for s in batch.seqs]
        for keys, values, q in self.scout_layers(batch, stride):
            for m, s, sq in zip(mass, batch.seqs, queries):
                m += attention_mass(q[sq.rows], keys, values, s.kv_slots, sq)
        return mass

    def scout_layers(self, batch: ForwardBatch, stride: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batch through the layers, stopping after the last scored one (it only writes
        its K/V): yields, at every `stride`-th layer, (the pool's keys, its values, the batch's
        queries) of that layer."""
        self.attn.plan(batch)
        x = self.model.embed(batch.input_ids)
        layers = self.model.layers[:len(self.model.layers) - (len(self.model.layers) - 1) % stride]
        for i, layer in enumerate(layers):
            q = layer.write_kv(x, batch, self.pool)
            if i % stride == 0:
                yield self.pool.get_key_buffer(layer.layer_id), self.pool.get_value_buffer(layer.layer_id), q
            if i + 1 < len(layers):
                x = layer.finish(x, q, batch, self.pool, self.attn)

    @torch.inference_mode()
    def run_cacheblend(self, seqs: list[BlendSeq]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (logits at each last position, recomputed positions of each sequence)."""
        device = seqs[0].input_ids.device
        full = ForwardBatch.build([
            (s.input_ids, torch.arange(s.input_ids.numel(), device=device), s.slots, s.slots) for s in seqs])
        x = self.model.embed(full.input_ids)
        layers = self.model.layers
        self.attn.plan(full)
        for layer in layers[:CACHEBLEND_CHECK_LAYER + 1]:
            x = layer(x, full, self.pool, self.attn)

        picked = [self._pick(s) for s in seqs]
        keep = torch.cat([p + view.q_start for p, view in zip(picked, full.seqs)])
        x = x[keep]
        sub = ForwardBatch.build([(s.input_ids[p], p, s.slots[p], s.slots) for s, p in zip(seqs, picked)])
        reuse = [self._reused(s, p) for s, p in zip(seqs, picked)]
        self.attn.plan(sub)
        for layer in layers[CACHEBLEND_CHECK_LAYER + 1:]:
            for dst, src in reuse:  # unpicked document tokens keep their cached KV
                self.pool.copy_slots(layer.layer_id, dst, src)
            x = layer(x, sub, self.pool, self.attn)
        return self.model.logits(x[sub.last_token_index()]), picked

    def _pick(self, s: BlendSeq) -> torch.Tensor:
        layer = CACHEBLEND_CHECK_LAYER
        k, v = self.pool.get_key_buffer(layer), self.pool.get_value_buffer(layer)
        fresh = s.slots[s.doc_positions]
        dev = ((k[fresh] - k[s.doc_slots]).float().pow(2).sum((1, 2))
               + (v[fresh] - v[s.doc_slots]).float().pow(2).sum((1, 2)))
        chosen = s.doc_positions[cacheblend_pick(dev, s.ratio)] if dev.numel() else s.doc_positions
        recompute = s.always.clone()
        recompute[chosen] = True
        return recompute.nonzero().flatten()

    def _reused(self, s: BlendSeq, picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_picked = torch.zeros_like(s.always)
        is_picked[picked] = True
        unpicked = ~is_picked[s.doc_positions]
        return s.slots[s.doc_positions[unpicked]], s.doc_slots[unpicked]
