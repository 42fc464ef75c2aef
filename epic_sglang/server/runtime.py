"""The HTTP side's handle on the engine: async submit and stream over the scheduler thread.

A request's progress arrives from the scheduler thread as callbacks and is handed to the
event loop; a client that goes away (stream closed, connection dropped) aborts its request,
so its KV slots are freed at the next step.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request as HTTPRequest

from epic_sglang.engine import Engine, GenerateResult, Request
from epic_sglang.scheduler import Progress, Scheduler

DISCONNECT_POLL_S = 0.5


class RequestFailed(RuntimeError):
    """The request could not be served (memory, an unreachable backend, internal error);
    `status`: the HTTP status when the raiser knows it."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Runtime:
    def __init__(self, scheduler: Scheduler, on_result: Callable[[GenerateResult], None] | None = None):
        self.scheduler = scheduler
        self.engine: Engine = scheduler.engine
        self.on_result = on_result  # metrics

    async def stream(self, request: Request, rid: str | None = None, http: HTTPRequest | None = None,
                     owner: str | None = None) -> AsyncIterator[Progress]:
        """Progress after every step until the request is done. Bad requests raise
        InvalidRequest (a reused rid: Conflict) before the first item; a failed one raises
        RequestFailed. `owner` (the API key's name) is who may abort it by rid."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Progress] = asyncio.Queue()

        def deliver(p: Progress) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, p)

        rid = await asyncio.wrap_future(self.scheduler.submit_future(request, deliver, rid, owner))
        done = False
        try:
            while not done:
                p = await self._next(queue, http)
                if p is None:  # client disconnected
                    return
                latest = p
                while not latest.done and not queue.empty():  # skip to the newest progress
                    latest = queue.get_nowait()
                done = latest.done
                if latest.error is not None:
                    raise RequestFailed(latest.error, latest.error_status)
                if latest.result is not None and self.on_result is not None:
                    self.on_result(latest.result)
                yield latest
        finally:
            if not done:
                self.scheduler.abort(rid)

    async def generate(self, request: Request, rid: str | None = None, http: HTTPRequest | None = None,
                       owner: str | None = None) -> GenerateResult | None:
        """The finished result (None when the client went away first)."""
        async for p in self.stream(request, rid, http, owner):
            if p.result is not None:
                return p.result
        return None

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the scheduler thread."""
        return await asyncio.wrap_future(self.scheduler.call(fn))

    @staticmethod
    async def _next(queue: asyncio.Queue, http: HTTPRequest | None) -> Progress | None:
        # asyncio.wait (not wait_for) so a timeout never cancels a get that took an item
        getter = asyncio.ensure_future(queue.get())
        while True:
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                return getter.result()
            if http is not None and await http.is_disconnected():
                getter.cancel()
                return None
