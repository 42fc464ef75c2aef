"""Decode's turn under a steady stream of link passes.

SGLang 0.5.16's scheduler runs a new prefill batch whenever it can form one ("Run prefill first
if possible", `Scheduler.get_next_batch_to_run`). A linked request's prefill is a short link
pass, so under a steady stream of them a prefill batch can be formed almost every round, and
running requests wait for their next token behind every arrival (the RAG load at 32 req/s on an
H100: 107 ms per output token at p50 against 23 at 16 req/s; BENCHMARKS.md, session 23's notes).

`EPIC_SGLANG_MAX_CONSECUTIVE_PREFILLS=N` (1, the default; 0: SGLang's rule) lets at most N prefill
batches run back to back while requests are decoding; then one decode step runs before the
next prefill batch is formed. At 1 the same load ran 52 ms per output token at p50 and completed
29 requests a second while it lasted, against none before its arrivals stopped under SGLang's rule
(session 24's notes; the two runs on two H100 hosts). Upstream's proposal of the same bound (sgl-project/sglang#32775,
`--max-consecutive-prefill-batches`) is not in 0.5.16. As there, a chunked prefill in progress
keeps its turn, and a mixed batch (`--enable-mixed-chunk`: the running requests' decode step
rides in it) owes none.
"""
from __future__ import annotations

import os

from sglang.srt.managers.schedule_batch import NextBatchPlan

VARIABLE = "EPIC_SGLANG_MAX_CONSECUTIVE_PREFILLS"
TARGET = "sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill"


def max_consecutive_prefills() -> int:
    value = os.environ.get(VARIABLE, "1")
    if not value.isdigit():
        raise ValueError(f"{VARIABLE} must be a whole number >= 0 (0: SGLang's prefill-first rule), got {value!r}")
    return int(value)


def decoding(running_batch) -> bool:
    return not running_batch.is_empty() and not running_batch.is_prefill_only


def yield_to_decode(limit: int):
    """The hook of `Scheduler.get_new_batch_prefill` (around): no prefill batch this round once
    `limit` ran in a row while requests decode, so the scheduler runs their decode step."""
    def hook(original, scheduler, running_batch, *args, **kwargs) -> NextBatchPlan:
        streak = getattr(scheduler, "epic_prefill_streak", 0)
        if streak >= limit and scheduler.chunked_req is None and decoding(running_batch):
            scheduler.epic_prefill_streak = 0
            return NextBatchPlan(batch_to_run=None, running_batch=running_batch)
        plan = original(scheduler, running_batch, *args, **kwargs)
        batch = plan.batch_to_run
        # a mixed batch (`--enable-mixed-chunk`) runs the decode step inside it: no turn is owed
        starves = batch is not None and not (batch.forward_mode is not None and batch.forward_mode.is_mixed())
        scheduler.epic_prefill_streak = streak + 1 if starves else 0
        return plan
    return hook
