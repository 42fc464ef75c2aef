"""Continuous batching: requests join and leave between steps; shutdown drains; aborts free memory."""
from __future__ import annotations

import threading

import pytest

from epic_sglang.engine import Request
from epic_sglang.sampling import SamplingParams
from epic_sglang.scheduler import Scheduler, ServerBusy


class Collector:
    def __init__(self):
        self.events: dict[str, list] = {}
        self.done = threading.Event()
        self.expected = 0
        self.lock = threading.Lock()
        self.order: list = []  # every progress, in arrival order

    on_progress = None  # called with every progress (under the lock)

    def __call__(self, p):
        with self.lock:
            if self.on_progress is not None:
                self.on_progress(p)
            self.order.append(p)
            self.events.setdefault(p.rid, []).append(p)
            if p.done and sum(e[-1].done for e in self.events.values()) == self.expected:
                self.done.set()


@pytest.fixture
def scheduler(engine):
    s = Scheduler(engine, max_running=8, prefill_token_budget=4096)
    s.start()
    yield s
    s.shutdown(timeout=120)


def req(question: str, n: int, docs=(), **kw) -> Request:
    return Request(question, list(docs), None, "legolink-16", SamplingParams(max_new_tokens=n, **kw))


def test_scheduler_results_equal_generate_batch(engine, scheduler, hotpot):
    requests = [req(ex.question, 8, ex.paragraphs[:3]) for ex in hotpot[:4]]
    expect = engine.generate_batch([req(ex.question, 8, ex.paragraphs[:3]) for ex in hotpot[:4]])
    got = Collector()
    got.expected = len(requests)
    rids = [scheduler.submit(r, got) for r in requests]
    assert got.done.wait(300)
    for rid, e in zip(rids, expect):
        assert got.events[rid][-1].result.output_ids == e.output_ids


def test_a_late_request_is_served_while_a_long_one_decodes(engine, scheduler):
    got = Collector()
    got.expected = 2
    long_rid = scheduler.submit(req("Tell a story.", 60, ignore_eos=True), got)
    decoding = threading.Event()
    got.on_progress = lambda p: p.rid == long_rid and len(p.output_ids) >= 3 and decoding.set()
    assert decoding.wait(300), "the long request never decoded"  # bounded: a stuck scheduler fails, never hangs
    short_rid = scheduler.submit(req("Say hi.", 2, ignore_eos=True), got)
    assert got.done.wait(300)
    short_done = next(i for i, p in enumerate(got.order) if p.rid == short_rid and p.done)
    long_before = [len(p.output_ids) for p in got.order[:short_done] if p.rid == long_rid]
    assert len(got.events[short_rid][-1].result.output_ids) == 2
    assert long_before[-1] < 60  # the short one finished while the long one was still decoding
    assert len(got.events[long_rid][-1].result.output_ids) == 60
    assert engine.kv_usage()["private"] == 0


def test_abort_frees_and_shutdown_drains(engine):
    scheduler = Scheduler(engine, max_running=8)
    scheduler.start()
    got = Collector()
    got.expected = 3
    victim = scheduler.submit(req("Tell a story.", 500, ignore_eos=True), got)
    others = [scheduler.submit(req(f"Count to {i}.", 4, ignore_eos=True), got) for i in (3, 5)]
    scheduler.abort(victim)
    scheduler.shutdown(timeout=300)  # returns once everything queued has finished
    assert got.done.is_set()
    assert got.events[victim][-1].result.finish_reason["type"] == "abort"
    assert all(len(got.events[r][-1].result.output_ids) == 4 for r in others)
    with pytest.raises(ServerBusy):
        scheduler.submit(req("late", 1), got)
    kv = engine.kv_usage()
    assert (kv["private"], kv["locked"], kv["request_rows_in_use"]) == (0, 0, 0)


def test_bad_request_is_refused_at_submit_and_holds_nothing(engine, scheduler):
    before = engine.kv_usage()
    with pytest.raises(ValueError, match="unknown policy"):
        scheduler.submit(Request("q?", [], None, "magic"), Collector())
    assert engine.kv_usage() == before


def test_namespaces_are_served_round_robin(engine):
    scheduler = Scheduler(engine, max_running=8, prefill_token_budget=1)  # one admission per step
    got = Collector()
    got.expected = 4
    rids = {}
    for name, ns in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")):
        r = req(f"Say {name}.", 2, ignore_eos=True)
        r.namespace = ns
        rids[scheduler.submit(r, got)] = name
    scheduler.start()  # everything is queued before the first step
    scheduler.shutdown(timeout=300)
    first_seen = list(dict.fromkeys(rids[p.rid] for p in got.order))
    assert first_seen == ["a1", "b1", "a2", "a3"]  # b1 does not wait behind tenant a's burst
