"""Where each token of a linked request lives, and what it attends to.

SGLang's extend batch is "cached prefix, then new tokens": a request's row in
`req_to_token` holds its prefix's reused slots followed by the slots the forward writes.
A linked request's row holds only its private tokens, in prompt order:

    [exact prefix (the exact-prefix tree's slots) | computed tokens (LegoLink's recomputed
     first k of every document, the text between documents, the question) | generated]

Which tokens are computed is the engine's rule (`epic_sglang.link_plan`, `plan_spans` over
the documents found cached). The reused document tokens (the cached runs) stay in their
document's shared slots: nothing is copied. Every query attends all tokens before it in
prompt order (the design card's mask): the private ones through SGLang's own causal row (its
row order is prompt order), the cached runs through extra entries over the shared slots
for the queries after them, the queries rotated to their document's place (`rotary.py`,
`attention.py`). Positions are the prompt positions, so the model sees every token where
it sits in the prompt, not where its row slot is; in decode they run past the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from epic_sglang.link_plan import LinkPlan, run_query_starts


@dataclass(frozen=True)
class CachedRun:
    """Reused tokens [start, start + length) of the prompt: document `doc`'s compiled KV
    from token `offset` on, read in place; it was compiled at position `offset` (after
    legolink0's sinks if any) and is scored as if at `start`."""
    start: int
    length: int
    doc: int
    offset: int


@dataclass(frozen=True)
class RowLayout:
    order: np.ndarray  # prompt position of each row slot (the private tokens, ascending)
    exact_prefix_len: int  # rows [0, exact_prefix_len): the exact-prefix tree's slots
    cached_runs: tuple[CachedRun, ...]  # in prompt order; not in the row
    prompt_len: int

    @cached_property  # every decode step asks (`LinkRequest.position_shift`); querylink has hundreds of runs
    def reused_tokens(self) -> int:
        """Document tokens read in place from their documents' shared slots."""
        return sum(r.length for r in self.cached_runs)

    @property
    def extend_len(self) -> int:
        return len(self.order) - self.exact_prefix_len

    @property
    def extend_positions(self) -> np.ndarray:
        return self.order[self.exact_prefix_len:]

    def run_query_starts(self) -> list[int]:
        """For each cached run, the first extend token after it (`link_plan.run_query_starts`)."""
        return run_query_starts([(r.start, r.length) for r in self.cached_runs], self.extend_positions.tolist())

    def row_of(self) -> np.ndarray:
        """The row slot of each prompt position, -1 for the reused ones (the inverse of `order`)."""
        rows = np.full(self.prompt_len, -1, dtype=np.int64)
        rows[self.order] = np.arange(len(self.order))
        return rows


def plan_rows(plan: LinkPlan, exact_prefix_len: int) -> RowLayout:
    """The row of a prompt linked by `plan` (its documents: the ones found cached, ids =
    their index in the link hint), with the first `exact_prefix_len` tokens (all before the
    first document) found in the exact-prefix tree."""
    if plan.doc_spans and exact_prefix_len > plan.doc_spans[0][0]:
        raise ValueError("the exact prefix must end before the first document")
    runs = tuple(CachedRun(*run) for run in plan.reused_runs())
    private = plan.recompute.clone()
    private[:exact_prefix_len] = True
    return RowLayout(private.nonzero().flatten().numpy().astype(np.int64), exact_prefix_len, runs, plan.num_tokens)
