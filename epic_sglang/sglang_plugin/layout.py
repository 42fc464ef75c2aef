"""Where each token of a linked request lives in its SGLang KV row, and what it attends to.

SGLang's extend batch is "cached prefix, then new tokens": a request's row in
`req_to_token` holds `prefix_len` reused slots followed by the slots the forward writes.
LegoLink's recomputed tokens are scattered (first k of every document, the text between
documents, the question), so the row is a permutation of the prompt:

    [exact prefix | cached runs (document tokens past k) | computed runs, in prompt order]

Every query of a computed run attends all tokens before it in prompt order: the design
card's mask (attend iff key position <= query position). `attention.py` plans that as
FlashInfer entries over the row's slots (per-run causal entries, grouped runs sharing one
entry for the keys before them), with no mask tensor. Positions are the prompt positions, so
the model sees the document where it sits, not where its row slot is.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
    compute_runs: tuple[tuple[int, int], ...]  # [start, end) prompt ranges computed now

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

    def row_of(self) -> np.ndarray:
        """The row slot of each prompt position (the inverse of `order`)."""
        rows = np.empty_like(self.order)
        rows[self.order] = np.arange(len(self.order))
        return rows

    def query_runs(self) -> list[tuple[int, int]]:
        """The computed runs as the engine's attention plans them: (queries up to the end of
        the run, position just past it); extend tokens are the runs in prompt order."""
        counts = np.cumsum([end - start for start, end in self.compute_runs])
        return [(int(c), end) for c, (_, end) in zip(counts, self.compute_runs)]


def plan_rows(num_tokens: int, docs: Sequence[tuple[int, int]], k: int, hits: Sequence[bool],
              exact_prefix_len: int) -> RowLayout:
    """The row of a prompt of `num_tokens` tokens whose documents `docs` ([start, end)
    spans) are cached where `hits` says, with the first `exact_prefix_len` tokens (all
    before the first document) found in the exact-prefix tree. The prompt's last token is
    always computed: its logits are the first output token."""
    if docs and exact_prefix_len > docs[0][0]:
        raise ValueError("the exact prefix must end before the first document")
    reused = np.zeros(num_tokens, dtype=bool)
    reused[:exact_prefix_len] = True
    runs = []
    for j, ((start, end), hit) in enumerate(zip(docs, hits)):
        end = min(end, num_tokens - 1)
        if hit and start + k < end:
            runs.append(CachedRun(start + k, end - start - k, j, k))
            reused[start + k:end] = True
    computed = np.flatnonzero(~reused)
    order = np.concatenate([np.arange(exact_prefix_len)]
                           + [np.arange(r.start, r.start + r.length) for r in runs] + [computed])
    breaks = np.flatnonzero(np.diff(computed) != 1) + 1
    compute_runs = tuple((int(c[0]), int(c[-1]) + 1) for c in np.split(computed, breaks) if len(c))
    return RowLayout(order.astype(np.int64), exact_prefix_len, tuple(runs), compute_runs)
