"""The HTTP server: SGLang's native API, the OpenAI API, RAG and documents, metrics.

    app = create_app(ServerConfig(model="smollm2-135m", store=Path("~/rag-store")))
    uvicorn.run(app, host="127.0.0.1", port=30000)
"""
from __future__ import annotations

import gc
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Awaitable, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from epic_sglang.engine import Engine
from epic_sglang.errors import InvalidRequest
from epic_sglang.scheduler import Scheduler, ServerBusy
from epic_sglang.server import native, openai_api, rag, sglang_proxy
from epic_sglang.server.access import AccessPolicy
from epic_sglang.server.config import ServerConfig
from epic_sglang.server.documents import DocumentService
from epic_sglang.server.inputs import PromptResolver, printable, validation_message
from epic_sglang.server.metrics import Metrics
from epic_sglang.server.runtime import RequestFailed, Runtime

log = logging.getLogger("epic_sglang.server")
OPEN_PATHS = {"/health", "/metrics"}  # reachable without the API key (probes, scrapers)


def _admin(path: str) -> bool:
    return path.startswith("/v1/documents") or path == "/flush_cache"


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               409: "conflict_error", 413: "invalid_request_error", 503: "server_busy"}


def error(status: int, message: str, kind: str | None = None) -> JSONResponse:
    """The one error envelope: {"error": {"message", "type", "code"}}."""
    kind = kind or ERROR_TYPES.get(status, "server_error")
    return JSONResponse({"error": {"message": printable(message), "type": kind, "code": status}}, status_code=status)


def bearer_token(headers: dict[bytes, bytes]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (scheme in any case), or None.
    Bytes outside ASCII are kept as latin-1 characters, so they can never match a key by accident."""
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Gate:
    """ASGI middleware: API keys (the caller's grant goes in the request's state), body size
    limit, one JSON log line per request. (Pure ASGI, so streaming responses and
    client-disconnect detection pass through untouched.)"""

    def __init__(self, app, config: ServerConfig, metrics: Metrics, access: AccessPolicy):
        self.app, self.config, self.metrics, self.access = app, config, metrics, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, path, method = time.perf_counter(), scope["path"], scope["method"]
        status = {"code": 0}

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        refusal = self._refuse(scope)
        if refusal is not None:
            await refusal(scope, receive, send_logged)
        else:
            await self.app(scope, self._limited(receive), send_logged)
        if status["code"] >= 400:
            self.metrics.http_errors.labels(str(status["code"])).inc()
        log.info(json.dumps({"method": method, "path": path, "status": status["code"],
                             "ms": round(1000 * (time.perf_counter() - t0), 1)}))

    def _refuse(self, scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        path = scope["path"]
        grant = self.access.grant(bearer_token(headers))
        scope.setdefault("state", {})["grant"] = grant
        if path not in OPEN_PATHS:
            if grant is None:
                return error(401, "missing or wrong API key: send Authorization: Bearer <key>")
            if _admin(path) and not grant.admin:
                return error(403, "this route manages the server: it needs the admin API key")
        length = headers.get(b"content-length", b"0").decode("latin-1")
        if not length.isdigit():
            return error(400, "Content-Length must be a number of bytes")
        if int(length) > self.config.max_body_bytes:
            return error(413, f"request body over {self.config.max_body_bytes} bytes")
        return None

    def _limited(self, receive):
        seen = {"bytes": 0}
        limit = self.config.max_body_bytes

        async def limited():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    raise BodyTooLarge()
            return message
        return limited


class BodyTooLarge(ValueError):
    pass


def _version() -> str:
    try:
        return version("epic-sglang")
    except PackageNotFoundError:
        return "dev"


def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """The app over an engine (built from the config when not given); the scheduler starts
    with the app and, at shutdown, finishes in-flight requests before it stops."""
    if engine is None:
        engine = Engine(config.model, device=config.device, kv_cache_gb=config.kv_cache_gb,
                        kv_dir=config.kv_dir, host_cache_gb=config.host_cache_gb,
                        max_requests=max(64, config.max_running))
    scheduler = Scheduler(engine, config.max_running, config.prefill_token_budget, config.max_queued)
    metrics = Metrics()
    app = assemble(config, Runtime(scheduler, on_result=metrics.observe), engine, metrics,
                   (native.router, native.engine_router, openai_api.router, rag.router),
                   start=scheduler.start, stop=scheduler.shutdown)
    metrics.add_gauges(lambda: {**scheduler.call(_gauges).result(), "queue_depth": scheduler.queue_depth,
                                "running": scheduler.num_running})
    return app


def freeze_startup_objects() -> None:
    """Call once the app is built: what startup made (the model's modules, the tokenizer,
    the routes) lives as long as the server, so the cyclic collector stops re-scanning it, as
    SGLang's scheduler does; otherwise every full collection walks all of it while requests
    wait (`benchmarks/gc_pause.py`)."""
    gc.collect()  # what loading left as garbage is freed, not frozen
    gc.freeze()


def create_sglang_front(config: ServerConfig, sglang_url: str, tokenizer, max_context_len: int,
                        sglang_api_key: str | None = None, stop: Callable[[], None] | None = None) -> FastAPI:
    """Our API over a SGLang server running the plugin (`--engine sglang`): /generate (with
    documents, kv_hints, transparent detection), the OpenAI API, /v1/rag, /v1/documents.
    SGLang's cache, abort and info routes are forwarded to it. `stop` runs at shutdown (the
    CLI stops the SGLang server it started there: uvicorn ends a SIGTERM'd process by the
    signal itself, so atexit handlers never run)."""
    from epic_sglang.sglang_plugin.runtime import SGLangEngine, SGLangRuntime

    engine = SGLangEngine(sglang_url, tokenizer, max_context_len, sglang_api_key)
    metrics = Metrics()
    return assemble(config, SGLangRuntime(engine, on_result=metrics.observe), engine, metrics,
                    (native.router, openai_api.router, rag.router, sglang_proxy.router), stop=stop, aclose=engine.close)


def assemble(config: ServerConfig, runtime, engine, metrics: Metrics, routers, start: Callable[[], None] | None = None,
             stop: Callable[[], None] | None = None, aclose: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    """The app around a runtime: routes, API keys, limits, errors, metrics, document store."""
    documents = DocumentService(config.store, engine.tokenizer) if config.store else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start is not None:
            start()
        yield
        if stop is not None:
            stop()
        if aclose is not None:
            await aclose()
        if documents is not None:
            documents.close()

    app = FastAPI(title="epic-sglang", version=_version(), lifespan=lifespan)
    app.state.config, app.state.engine, app.state.metrics = config, engine, metrics
    app.state.runtime = runtime
    app.state.documents = documents
    app.state.resolver = PromptResolver(config, engine.tokenizer, documents)
    app.state.version, app.state.started = _version(), time.time()
    for router in routers:
        app.include_router(router)
    app.add_middleware(Gate, config=config, metrics=metrics,
                       access=AccessPolicy(config.api_key, config.admin_api_key, config.api_keys))

    @app.get("/metrics")
    async def prometheus():
        body = await run_in_threadpool(generate_latest, metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: HTTPRequest, e: BodyTooLarge):
        return error(413, f"request body over {config.max_body_bytes} bytes")

    @app.exception_handler(InvalidRequest)
    async def bad_request(_: HTTPRequest, e: InvalidRequest):
        return error(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HTTPRequest, e: RequestValidationError):
        return error(400, validation_message(e.errors()))

    @app.exception_handler(ServerBusy)
    async def busy(_: HTTPRequest, e: ServerBusy):
        return error(503, str(e))

    @app.exception_handler(RequestFailed)
    async def failed(_: HTTPRequest, e: RequestFailed):
        return error(e.status or 500, str(e))

    @app.exception_handler(Exception)
    async def internal(http: HTTPRequest, e: Exception):  # a bug: the client is told so, not blamed
        log.exception("internal error on %s %s", http.method, http.url.path)
        return error(500, f"internal error ({type(e).__name__}); the server logged it")

    return app


def _gauges(engine: Engine) -> dict:
    kv = engine.kv_usage()
    return {"kv_used_tokens": kv["total"] - kv["free"], "kv_total_tokens": kv["total"], "cache": engine.cache.stats()}

