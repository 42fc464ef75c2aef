"""The forward passes of compile and link, on one model, pool and attention backend.

- `run`: every token of the batch through every layer (compile, fr, naive, legolink, decode)
  together in one ragged batch.
- `run_cacheblend`: CacheBlend's selective pass; layers up to the check layer for all
  tokens, then only the picked tokens, reusing cached KV for the rest.
- `run_scout`: querylink's scout; the question (the prompt's non-document tokens) through
  the layers over the documents' cached KV, with `scout_attention.ScoutAttention` as its
  attention, which measures what the question takes from each document token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from epic_sglang.forward_batch import ForwardBatch
from epic_sglang.kv_pool import KVPool
from epic_sglang.link_plan import cacheblend_pick
from epic_sglang.models.decoder import CausalLM
from epic_sglang.models.rope import Rotary
from epic_sglang.policies import CACHEBLEND_CHECK_LAYER
from epic_sglang.scout_attention import ScoutAttention


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
    def run_scout(self, batch: ForwardBatch, scout: ScoutAttention) -> None:
        """querylink's scout: the batch through the layers up to the last that `scout` scores,
        `scout` as their attention (it accumulates the mass); the last one only attends.
        Nothing waits on the host: `cuda_graph.ScoutGraphs` captures it."""
        x = self.model.embed(batch.input_ids)
        last = max(scout.scored_layers)
        for layer in self.model.layers[:last + 1]:
            q = layer.write_kv(x, batch, self.pool)
            if layer.layer_id < last:
                x = layer.finish(x, q, batch, self.pool, scout)
            else:
                scout.forward(q, layer.layer_id, self.pool, batch)

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
