"""SGLang's native API, as SGLang 0.5.16's frontend (`sgl.RuntimeEndpoint`) and clients use it."""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from epic_sglang.engine import GenerateResult
from epic_sglang.errors import InvalidRequest, NotFound
from epic_sglang.scheduler import Progress
from epic_sglang.server.runtime import RequestFailed
from epic_sglang.server.inputs import (check_response_size, engine_request, grant_of, json_body, json_response, merge,
                                       owner_of, printable, require_object, samples, sampling_params)

GENERATE_KEYS = {"text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
                 "top_logprobs_num", "return_text_in_logprobs", "kv_hints", "image_data"}

log = logging.getLogger("epic_sglang.server")
router = APIRouter()  # generation: served over either runtime (in-process, SGLang front)
engine_router = APIRouter()  # the in-process engine's cache, scheduler and model


def meta_info(rid: str, result: GenerateResult, e2e: float) -> dict:
    s = result.stats
    meta = {"id": rid, "finish_reason": result.finish_reason or None, "prompt_tokens": s.prompt_tokens,
            "completion_tokens": len(result.output_ids), "cached_tokens": s.prompt_tokens - s.recomputed_tokens,
            "reused_tokens": s.reused_tokens, "recomputed_tokens": s.recomputed_tokens,
            "compiled_tokens": s.compiled_tokens, "cached_prefix_tokens": s.cached_prefix_tokens,
            "policy": result.policy, "ttft": s.ttft_s, "e2e_latency": e2e}
    if result.output_token_logprobs is not None:
        meta.update(input_token_logprobs=result.input_token_logprobs, output_token_logprobs=result.output_token_logprobs)
        if result.output_top_logprobs is not None:
            meta.update(input_top_logprobs=result.input_top_logprobs, output_top_logprobs=result.output_top_logprobs)
    return meta


def progress_json(p: Progress, t0: float, index: int | None) -> dict:
    if p.result is not None:
        out = {"text": p.result.text, "output_ids": p.result.output_ids, "meta_info": meta_info(p.rid, p.result, time.perf_counter() - t0)}
    else:
        out = {"text": p.text, "output_ids": p.output_ids,
               "meta_info": {"id": p.rid, "finish_reason": None, "prompt_tokens": p.prompt_tokens,
                             "completion_tokens": len(p.output_ids)}}
    if index is not None:
        out["index"] = index
    return out


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_response(items: AsyncIterator, render: Callable[[Any], list[dict]], head: list[dict] = (),
                       tail: Callable[[], list[dict]] = list) -> StreamingResponse:
    """An SSE stream: `head`, `render(item)` for each item, `tail()`, then `data: [DONE]`.
    The first item is awaited before the response starts, so a request refused before its
    first token gets a 4xx instead of a broken stream; closing the stream aborts the work."""
    first = await anext(items, None)

    async def events():
        try:
            for obj in head:
                yield sse(obj)
            item = first
            while item is not None:
                for obj in render(item):
                    yield sse(obj)
                item = await anext(items, None)
            for obj in tail():
                yield sse(obj)
        except Exception as e:  # noqa: BLE001 - the response has started: the error is the stream's last event
            status = getattr(e, "status", None) or 500
            log.warning("stream failed after its start: %s: %s", type(e).__name__, e)
            yield sse({"error": {"message": printable(str(e)) if status < 500 or isinstance(e, RequestFailed)
                                 else f"internal error ({type(e).__name__})", "type": "server_error", "code": status}})
        finally:
            await items.aclose()
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


async def _jobs(http: HTTPRequest, body: dict) -> tuple[list, bool]:
    """(engine requests with their rids, whether the input was a batch)."""
    app, grant = http.app, grant_of(http)
    resolver = app.state.resolver
    if ("text" in body) == ("input_ids" in body):
        raise InvalidRequest("give exactly one of text or input_ids")
    if body.get("image_data") is not None:
        raise InvalidRequest("image_data is not supported: this server runs text models")
    prompts = body.get("text", body.get("input_ids"))
    is_text = "text" in body
    batch = isinstance(prompts, list) and (is_text or (prompts and isinstance(prompts[0], list)))
    prompts = prompts if batch else [prompts]
    if not prompts or len(prompts) > app.state.config.max_batch:
        raise InvalidRequest(f"a batch holds 1 to {app.state.config.max_batch} prompts, got {len(prompts)}")

    def per_prompt(key: str) -> list:
        v = body.get(key)
        if batch and isinstance(v, list):
            if len(v) != len(prompts):
                raise InvalidRequest(f"{key} has {len(v)} entries for {len(prompts)} prompts")
            return v
        return [v] * len(prompts)

    params_list, hints_list, rids = per_prompt("sampling_params"), per_prompt("kv_hints"), per_prompt("rid")
    if any(r is not None and (not isinstance(r, str) or not r) for r in rids):
        raise InvalidRequest("rid must be a non-empty string (or, for a batch, a list of them)")
    logprobs = {k: body[k] for k in ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")
                if body.get(k) is not None}
    _check_logprob_options(logprobs)
    jobs = []
    for i, prompt in enumerate(prompts):
        hints = resolver.hints(hints_list[i])
        namespace = grant.namespace(hints.get("namespace"))
        segments = (await resolver.text_segments(prompt, hints, namespace)) if is_text else resolver.id_segments(prompt, hints)
        params, n = sampling_params(params_list[i], app.state.config)
        policy = resolver.policy_of(hints.get("policy"))
        rid = rids[i] if rids[i] is not None else uuid.uuid4().hex
        for j, p in enumerate(samples(params, n)):
            jobs.append((engine_request(segments, policy, p, namespace, logprobs), rid if n == 1 else f"{rid}-{j}"))
    if len({rid for _, rid in jobs}) < len(jobs):
        raise InvalidRequest("every prompt of a batch needs its own rid")
    return jobs, batch or len(jobs) > 1


def _check_logprob_options(opts: dict) -> None:
    for key, kind in (("return_logprob", bool), ("return_text_in_logprobs", bool), ("logprob_start_len", int),
                      ("top_logprobs_num", int)):
        if key in opts and (not isinstance(opts[key], kind) or (kind is int and isinstance(opts[key], bool))):
            raise InvalidRequest(f"{key} must be {'a boolean' if kind is bool else 'an integer'}")
    if opts.get("top_logprobs_num", 0) < 0 or opts.get("top_logprobs_num", 0) > 20:
        raise InvalidRequest("top_logprobs_num must be in [0, 20]")
    if opts.get("logprob_start_len", -1) < -1:
        raise InvalidRequest("logprob_start_len must be >= -1 (-1: no prompt logprobs)")


@router.post("/generate")
async def generate(http: HTTPRequest):
    t0 = time.perf_counter()
    app = http.app
    body = require_object(await json_body(http), GENERATE_KEYS, "the /generate body")
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("stream must be true or false")
    jobs, batch = await _jobs(http, body)
    check_response_size([req for req, _ in jobs], app.state.config)
    runtime = app.state.runtime
    streams = [runtime.stream(req, rid, http, owner_of(http)) for req, rid in jobs]
    if body.get("stream"):
        return await sse_response(merge(streams), lambda item: [progress_json(item[1], t0, item[0] if batch else None)])
    finals: dict[int, Progress] = {}
    async for i, p in merge(streams):
        if p.done:
            finals[i] = p
    if len(finals) < len(jobs):  # the client went away
        return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed", "code": 499}},
                            status_code=499)

    def build():
        outs = [progress_json(finals[i], t0, None) for i in range(len(jobs))]
        return outs if batch else outs[0]
    return await json_response(build)


@engine_router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(http: HTTPRequest):
    freed = await http.app.state.runtime.call(lambda e: e.flush_cache())
    return JSONResponse({"message": "Cache flushed.", "freed_tokens": freed})


@engine_router.post("/abort_request")
async def abort_request(http: HTTPRequest):
    """A caller aborts its own requests only (an admin: any; abort_all: all of the caller's)."""
    body = require_object(await json_body(http), {"rid", "abort_all"}, "the /abort_request body")
    scheduler, grant = http.app.state.runtime.scheduler, grant_of(http)
    owner = None if grant.admin else grant.name
    if body.get("abort_all") is True:
        scheduler.abort_all(owner)
    elif isinstance(body.get("rid"), str):
        if not scheduler.abort(body["rid"], owner):
            raise NotFound(f"no request with rid {body['rid']!r} in flight for this API key")
    else:
        raise InvalidRequest("give rid (a string) or abort_all: true")
    return {"message": "abort requested"}


def _model_info(http: HTTPRequest) -> dict:
    """As SGLang's: `model_path` is the folder it loaded (a client can load its tokenizer
    from there), `served_model_name` the name clients use."""
    state = http.app.state
    return {"model_path": str(state.engine.model_dir), "tokenizer_path": str(state.engine.model_dir),
            "served_model_name": state.config.model_name,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": "default",
            "has_image_understanding": False, "has_audio_understanding": False, "model_type": state.engine.config.model_type}


@engine_router.get("/model_info")
@engine_router.get("/get_model_info")
async def model_info(http: HTTPRequest):
    return _model_info(http)


@engine_router.get("/server_info")
@engine_router.get("/get_server_info")
async def server_info(http: HTTPRequest):
    state = http.app.state
    stats, kv = await state.runtime.call(lambda e: (e.cache.stats(), e.kv_usage()))
    cfg = state.config
    return {"version": state.version, "model_path": str(state.engine.model_dir), "served_model_name": cfg.model_name,
            "engine": "epic-sglang in-process",
            "device": str(state.engine.device), "dtype": str(state.engine.dtype), "default_policy": cfg.policy,
            "context_length": state.engine.max_context_len, "max_running_requests": state.runtime.scheduler.max_running,
            "prefill_token_budget": cfg.prefill_token_budget, "transparent_documents": cfg.transparent_documents,
            "document_store": str(cfg.store) if cfg.store else None, "kv_dir": str(cfg.kv_dir) if cfg.kv_dir else None,
            "kv": kv, "cache": stats,
            "queue_depth": state.runtime.scheduler.queue_depth, "running": state.runtime.scheduler.num_running}


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/health_generate")
async def health_generate(http: HTTPRequest):
    """A one-token generation through the scheduler: the engine is alive, not just the server."""
    state = http.app.state
    params, _ = sampling_params({"max_new_tokens": 1}, state.config)
    segments = state.resolver.builder.from_text("ping", [])
    result = await state.runtime.generate(engine_request(segments, "fr", params, "epic-health"), None, http)
    return {"status": "ok", "generated_tokens": len(result.output_ids) if result else 0}
