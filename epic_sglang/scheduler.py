"""Continuous batching over the engine's step API, on one background thread.

Every iteration: admit waiting requests under a token budget (their compile misses run in
one pass), then ONE forward that carries the new requests' link passes together with one
decode token of every running request. Requests join and leave between steps, so a long
answer never holds back a new request's first token for more than one step.

Fairness: one FIFO queue per namespace (tenant), served round robin, so one tenant's burst
does not starve another. Memory pressure: a batch that finds no KV slots waits until
running requests free some; a decode step that finds none retracts the newest request.

The engine is not thread-safe: everything that touches it runs on this thread, admission
(validation) included (`submit` hands it over and waits), and `call` for the rest.

A failure that belongs to one request (sampling, a grammar, logprobs) fails that request
alone; only a failure of the shared forward fails the step's requests, and the next step
serves whatever comes next.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from epic_sglang.engine import Engine, GenerateResult, Request, RunningRequest
from epic_sglang.errors import Conflict
from epic_sglang.kv_pool import PoolExhausted

log = logging.getLogger("epic_sglang.scheduler")


@dataclass
class Progress:
    """What a waiting client learns after each step: the request's text and tokens so far;
    `result` once it finished, `error` if it failed (then nothing else follows)."""
    rid: str
    text: str
    output_ids: list[int]
    prompt_tokens: int = 0
    result: GenerateResult | None = None
    error: str | None = None
    error_status: int = 500  # the HTTP status of `error`: 503 when the server lacks memory for it

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


Callback = Callable[[Progress], None]


@dataclass
class _Entry:
    rid: str
    state: RunningRequest
    callback: Callback
    owner: str | None = None  # who may abort it (the API key's name)


class ServerBusy(RuntimeError):
    """Refused at the door: shutting down or the queue is full."""


class Scheduler:
    def __init__(self, engine: Engine, max_running: int = 32, prefill_token_budget: int = 8192,
                 max_queued: int = 1024):
        self.engine = engine
        self.max_running = min(max_running, len(engine.req_to_token_pool.req_to_token))
        self.prefill_token_budget = prefill_token_budget
        self.max_queued = max_queued
        self._cv = threading.Condition()
        self._waiting: OrderedDict[str | None, deque[_Entry]] = OrderedDict()
        self._running: list[_Entry] = []
        self._owners: dict[str, str | None] = {}  # rids in flight (waiting or running) -> owner
        self._aborted: set[str] = set()
        self._calls: deque[tuple[Callable[[Engine], Any], Future]] = deque()
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="epic-scheduler", daemon=True)

    # ----------------------------------------------------------------- client side (any thread)
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, callback: Callback, rid: str | None = None, owner: str | None = None) -> str:
        """Queue a request; returns its rid. Admission (validation) runs on the scheduler
        thread; InvalidRequest (bad input), Conflict (rid in flight) and ServerBusy are
        raised here."""
        return self.submit_future(request, callback, rid, owner).result()

    def submit_future(self, request: Request, callback: Callback, rid: str | None = None,
                      owner: str | None = None) -> Future:
        """`submit` without waiting: a Future of the rid (or of the refusal)."""
        if not self._accepting:
            raise ServerBusy("server is shutting down")
        if self.queue_depth >= self.max_queued:
            raise ServerBusy(f"queue full ({self.max_queued} waiting); retry later")
        admit = lambda engine: self._enqueue(engine.admit(request), callback, rid or uuid.uuid4().hex, owner)  # noqa: E731
        if self._thread.is_alive():
            return self.call(admit)
        fut: Future = Future()  # not started yet: no other thread touches the engine
        self._run_call(admit, fut)
        return fut

    def _enqueue(self, state: RunningRequest, callback: Callback, rid: str, owner: str | None) -> str:
        with self._cv:
            if rid in self._owners:
                raise Conflict(f"a request with rid {rid!r} is in flight; use another rid")
            self._owners[rid] = owner
            self._waiting.setdefault(state.request.namespace, deque()).append(_Entry(rid, state, callback, owner))
            self._cv.notify()
        return rid

    def abort(self, rid: str, owner: str | None = None) -> bool:
        """Stop a request (client gone, /abort_request); its memory is freed at the next step.
        With `owner`, only a request of that owner; returns whether one was in flight."""
        with self._cv:
            if rid not in self._owners or (owner is not None and self._owners[rid] != owner):
                return False
            self._aborted.add(rid)
            self._cv.notify()
        return True

    def abort_all(self, owner: str | None = None) -> None:
        """Stop every request in flight (with `owner`: that owner's)."""
        with self._cv:
            self._aborted.update(r for r, o in self._owners.items() if owner is None or o == owner)
            self._cv.notify()

    def call(self, fn: Callable[[Engine], Any]) -> Future:
        """Run fn(engine) on the scheduler thread between steps (compile, flush, stats)."""
        fut: Future = Future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued and running ones, stop the thread."""
        self._accepting = False
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ----------------------------------------------------------------- the loop (scheduler thread)
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting_any() or self._running or self._calls or self._aborted or self._stop):
                    self._cv.wait()
                if self._stop and not self._waiting_any() and not self._running and not self._calls:
                    return
                aborted, self._aborted = self._aborted, set()
                calls, self._calls = list(self._calls), deque()
            self._apply_aborts(aborted)  # first: a rid aborted now was enqueued before, never by these calls
            for fn, fut in calls:
                self._run_call(fn, fut)
            self._iterate()

    def _waiting_any(self) -> bool:
        return any(self._waiting.values())

    def _run_call(self, fn: Callable[[Engine], Any], fut: Future) -> None:
        try:
            fut.set_result(fn(self.engine))
        except Exception as e:
            fut.set_exception(e)

    def _apply_aborts(self, rids: set[str]) -> None:
        if not rids:
            return
        with self._cv:
            for q in self._waiting.values():
                for entry in [e for e in q if e.rid in rids]:
                    q.remove(entry)
                    self._finish(entry, abort="aborted by the client")
        for entry in [e for e in self._running if e.rid in rids]:
            self._running.remove(entry)
            self._finish(entry, abort="aborted by the client")

    def _iterate(self) -> None:
        admitted = self._admit()
        if not admitted and not self._running:
            return
        try:
            self._step(admitted)
        except Exception as e:  # a bug must not take the server down: fail what was in flight
            log.exception("scheduler step failed")
            for entry in admitted + self._running:
                self._fail(entry, f"internal error: {e}")
            self._running = []
            return
        still = []
        for entry in admitted + self._running:
            if entry.state.error is not None:  # this request alone failed in the step
                self._fail(entry, f"internal error: {entry.state.error}")
            elif entry.state.finished:
                self._finish(entry)
            else:
                still.append(entry)
                entry.callback(Progress(entry.rid, self.engine.streamable_text(entry.state), list(entry.state.output_ids),
                                        entry.state.stats.prompt_tokens))
        self._running = still

    def _step(self, admitted: list[_Entry]) -> None:
        while True:
            try:
                return self.engine.step([e.state for e in admitted], [e.state for e in self._running])
            except PoolExhausted:
                if not self._running:
                    raise
                self._finish(self._running.pop(), abort="KV pool exhausted; retry the request")

    def _admit(self) -> list[_Entry]:
        """Take waiting requests round robin by namespace under the token budget, and prefill
        them together; a batch that does not fit in memory goes back to wait."""
        batch, tokens = [], 0
        with self._cv:
            while len(self._running) + len(batch) < self.max_running and self._waiting_any():
                namespace, q = next((k, v) for k, v in self._waiting.items() if v)
                need = q[0].state.plan.num_tokens
                if batch and tokens + need > self.prefill_token_budget:
                    break
                batch.append(q.popleft())
                tokens += need
                self._waiting.move_to_end(namespace)  # round robin
        while batch:
            try:
                self.engine.prefill([e.state for e in batch])
                return batch
            except PoolExhausted as e:
                if self._running:  # memory frees as running requests finish: wait for it
                    self._requeue(batch)
                    return []
                if len(batch) == 1:
                    self._fail(batch[0], f"the request needs more KV memory than the server has: {e}", status=503)
                    return []
                self._requeue(batch[1:])  # alone, the first may fit
                batch = batch[:1]
            except Exception as e:  # a bug: fail these, keep serving
                log.exception("prefill failed")
                for entry in batch:
                    self._fail(entry, f"internal error: {e}")
                return []
        return []

    def _requeue(self, entries: list[_Entry]) -> None:
        with self._cv:
            for entry in reversed(entries):
                self._waiting.setdefault(entry.state.request.namespace, deque()).appendleft(entry)

    def _finish(self, entry: _Entry, abort: str | None = None) -> None:
        result = self.engine.finish(entry.state, abort=abort)
        self._forget(entry)
        entry.callback(Progress(entry.rid, result.text, list(result.output_ids), result.stats.prompt_tokens, result=result))

    def _fail(self, entry: _Entry, message: str, status: int = 500) -> None:
        self.engine.finish(entry.state, abort=message)
        self._forget(entry)
        entry.callback(Progress(entry.rid, "", [], error=message, error_status=status))

    def _forget(self, entry: _Entry) -> None:
        with self._cv:
            self._owners.pop(entry.rid, None)

