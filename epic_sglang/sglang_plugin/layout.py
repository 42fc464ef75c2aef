"""Where each token of a linked request lives in its SGLang KV row, and what it attends to.

SGLang's extend batch is "cached prefix, then new tokens": a request's row in
`req_to_token` holds `prefix_len` reused slots followed by the slots the forward writes.
LegoLink's recomputed tokens are scattered (first k of every document, the text between
documents, the question), so the row is a permutation of the prompt:

    [exact prefix | cached runs (document tokens past k) | computed runs, in prompt order]

Which tokens are computed is the engine's rule (`epic_sglang.link_plan`, `plan_spans` over
the documents found cached). Every query of a computed run attends all tokens before it in
prompt order: the design card's mask (attend iff key position <= query position).
`attention.py` plans that as
FlashInfer entries over the row's slots (per-run causal entries, grouped runs sharing one
entry for the keys before them), with no mask tensor. Positions are the prompt positions, so
the model sees the document where it sits, not where its row slot is.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epic_sglang.link_plan import LinkPlan, query_runs


@dataclass(frozen=True)
class CachedRun:
    """Reused tokens [start, start + length) of the prompt: document `doc`'s compiled KV
    from token `offset` on, re-rotated from where it was compiled (position `offset`, after
    legolink0's sinks if any) to position `start`."""
    start: int
    length: int
    doc: int
    offset: int


@dataclass(frozen=True)
class RowLayout:
    order: np.ndarray  # prompt position of each row slot
    exact_prefix_len: int  # rows [0, exact_prefix_len): the exact-prefix tree's slots
    cached_runs: tuple[CachedRun, ...]  # rows [exact_prefix_len, prefix_len), in this order

    @property
    def prefix_len(self) -> int:
        return self.exact_prefix_len + self.private_tokens

    @property
    def private_tokens(self) -> int:
        """Reused document tokens copied (re-rotated) into request-private slots."""
        return sum(r.length for r in self.cached_runs)

    @property
    def extend_len(self) -> int:
        return len(self.order) - self.prefix_len

    @property
    def extend_positions(self) -> np.ndarray:
        return self.order[self.prefix_len:]

    def query_runs(self) -> list[tuple[int, int]]:
        """`link_plan.query_runs` of the extend tokens (the computed runs, in prompt order)."""
        return query_runs(self.extend_positions.tolist())

    def row_of(self) -> np.ndarray:
        """The row slot of each prompt position (the inverse of `order`)."""
        rows = np.empty_like(self.order)
        rows[self.order] = np.arange(len(self.order))
        return rows


def plan_rows(plan: LinkPlan, exact_prefix_len: int) -> RowLayout:
    """The row of a prompt linked by `plan` (its documents: the ones found cached, ids =
    their index in the link hint), with the first `exact_prefix_len` tokens (all before the
    first document) found in the exact-prefix tree."""
    if plan.doc_spans and exact_prefix_len > plan.doc_spans[0][0]:
        raise ValueError("the exact prefix must end before the first document")
    runs = tuple(CachedRun(*run) for run in plan.reused_runs())
    computed = plan.recompute.clone()
    computed[:exact_prefix_len] = False
    computed = computed.nonzero().flatten().numpy()
    order = np.concatenate([np.arange(exact_prefix_len)]
                           + [np.arange(r.start, r.start + r.length) for r in runs] + [computed])
    return RowLayout(order.astype(np.int64), exact_prefix_len, runs)
