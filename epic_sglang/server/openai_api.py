"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Extensions (ignored by OpenAI clients, reachable with `extra_body`): `documents` on chat
(texts, {"text": ...} or {"id": n} of the namespace's ingested documents, linked with PIC),
`policy`, `namespace`, `kv_hints` on completions, `regex`, `ignore_eos`; every response
carries `epic` stats. Bodies are strict: numbers finite, booleans booleans, integers integers.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from epic_sglang.engine import GenerateResult
from epic_sglang.errors import InvalidRequest
from epic_sglang.policies import Segment
from epic_sglang.server.inputs import (check_response_size, engine_request, grant_of, json_body, json_response, merge,
                                       owner_of, samples, sampling_params, validated)
from epic_sglang.server.native import sse_response

router = APIRouter()
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # extensions
    top_k: int | None = None
    min_p: float | None = None
    regex: str | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    policy: str | None = None
    namespace: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # OpenAI's bounds
    response_format: dict | None = None
    documents: list[str | dict] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=5)  # OpenAI's bounds for completions
    echo: bool = False
    suffix: str | None = None
    kv_hints: dict | None = None


def _params(req: _Sampling, max_tokens: int | None, config, json_schema: str | None = None):
    d = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p, "n": req.n,
         "stop": req.stop, "seed": req.seed, "presence_penalty": req.presence_penalty,
         "frequency_penalty": req.frequency_penalty, "top_k": req.top_k, "min_p": req.min_p, "regex": req.regex,
         "ignore_eos": req.ignore_eos, "stop_token_ids": req.stop_token_ids, "json_schema": json_schema}
    return sampling_params(d, config)


def _usage(results: list[GenerateResult], n: int) -> dict:
    """Each prompt counted once (its n samples share it)."""
    prompt = sum(r.stats.prompt_tokens for r in results[::n])
    completion = sum(len(r.output_ids) for r in results)
    cached = sum(r.stats.prompt_tokens - r.stats.recomputed_tokens for r in results[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _epic(results: list[GenerateResult]) -> dict:
    s = results[0].stats
    return {"policy": results[0].policy, "reused_tokens": s.reused_tokens, "recomputed_tokens": s.recomputed_tokens,
            "compiled_tokens": s.compiled_tokens, "cached_prefix_tokens": s.cached_prefix_tokens, "ttft": s.ttft_s}


def _finish(r: GenerateResult) -> str | None:
    return FINISH.get((r.finish_reason or {}).get("type"))


def _text_of_content(content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise InvalidRequest(f"message content part of type {part.get('type')!r} is not supported; send text")
        parts.append(part.get("text", ""))
    return "".join(parts)


def _json_schema(response_format: dict | None) -> str | None:
    if not response_format or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema is None:
            raise InvalidRequest("response_format.json_schema.schema is required")
        return json.dumps(schema)
    raise InvalidRequest(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")


async def _chat_segments(app, req: ChatRequest, namespace: str) -> list[Segment]:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of_content(m.content)}
                for m in req.messages]
    if not req.documents:
        text = app.state.engine.prompts.render(messages)
        return await app.state.resolver.text_segments(text, {}, namespace, leading=False)
    if messages[-1]["role"] != "user":
        raise InvalidRequest("with documents, the last message must be the user's question")
    texts = await _document_texts(app, req.documents, namespace)
    system = "\n".join(m["content"] for m in messages[:-1] if m["role"] == "system") or None
    history = [m for m in messages[:-1] if m["role"] != "system"]
    return app.state.engine.prompts.build(messages[-1]["content"], texts, system, history)


async def _document_texts(app, documents: list[str | dict], namespace: str) -> list[str]:
    """Texts of the chat's documents: strings and {"text": ...} as given, {"id": n} from the
    namespace's ingested documents."""
    if len(documents) > app.state.config.max_documents:
        raise InvalidRequest(f"at most {app.state.config.max_documents} documents per request, got {len(documents)}")
    for d in documents:
        if isinstance(d, dict) and not (set(d) == {"id"} or (set(d) == {"text"} and isinstance(d["text"], str))):
            raise InvalidRequest('a document is a string, {"text": "..."} or {"id": <ingested document id>}')
    ids = [d["id"] for d in documents if isinstance(d, dict) and "id" in d]
    by_id = dict(zip(ids, await app.state.resolver.document_texts(ids, namespace))) if ids else {}
    return [d if isinstance(d, str) else d["text"] if "text" in d else by_id[d["id"]] for d in documents]


def _chat_logprobs(r: GenerateResult) -> dict | None:
    if r.output_token_logprobs is None:
        return None
    tops = r.output_top_logprobs or [[] for _ in r.output_token_logprobs]
    return {"content": [{"token": text, "logprob": lp, "bytes": list(text.encode()),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for v, _, t in top]}
                        for (lp, _, text), top in zip(r.output_token_logprobs, tops)]}


def _completion_logprobs(r: GenerateResult) -> dict | None:
    """OpenAI's completion logprobs: of the prompt's tokens too when they were asked for
    (echo), the first one's logprob and top entries null."""
    if r.output_token_logprobs is None:
        return None
    entries = (r.input_token_logprobs or []) + r.output_token_logprobs
    prompt_tops = r.input_top_logprobs or [[] for _ in r.input_token_logprobs or []]
    tops = prompt_tops + (r.output_top_logprobs or [[] for _ in r.output_token_logprobs])
    tokens = [t for _, _, t in entries]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in entries],
            "top_logprobs": [None if top is None else {t: v for v, _, t in top} for top in tops], "text_offset": offsets}


async def _run(http: HTTPRequest, jobs: list, stream_chunk, final_body, include_usage: bool, stream: bool):
    """Run the jobs; stream chunks (SSE) or return one body (built off the event loop)."""
    runtime = http.app.state.runtime
    check_response_size(jobs, http.app.state.config)
    streams = [runtime.stream(r, None, http, owner_of(http)) for r in jobs]
    merged = merge(streams)
    if stream:
        sent = [""] * len(jobs)
        results: list[GenerateResult | None] = [None] * len(jobs)

        def render(item) -> list[dict]:
            i, p = item
            delta = p.text[len(sent[i]):] if p.text.startswith(sent[i]) else ""
            sent[i] += delta
            if p.result is not None:
                results[i] = p.result
            return [stream_chunk(i, delta, p.result)] if delta or p.result is not None else []

        def usage() -> list[dict]:
            return [final_body(results, usage_only=True)] if include_usage and all(results) else []
        return await sse_response(merged, render, [stream_chunk(None, None, None, first_chunk=True)], usage)
    finals: list[GenerateResult | None] = [None] * len(jobs)
    async for i, p in merged:
        if p.result is not None:
            finals[i] = p.result
    if not all(finals):
        return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed", "code": 499}},
                            status_code=499)
    return await json_response(lambda: final_body(finals))


@router.post("/v1/chat/completions")
async def chat_completions(http: HTTPRequest):
    app = http.app
    req = validated(ChatRequest, await json_body(http), "the chat completion body")
    namespace = grant_of(http).namespace(req.namespace)
    params, n = _params(req, req.max_completion_tokens or req.max_tokens, app.state.config, _json_schema(req.response_format))
    segments = await _chat_segments(app, req, namespace)
    policy = app.state.resolver.policy_of(req.policy)
    logprobs = {"return_logprob": True, "top_logprobs_num": req.top_logprobs or 0, "return_text_in_logprobs": True} \
        if req.logprobs else None
    jobs = [engine_request(segments, policy, p, namespace, logprobs) for p in samples(params, n)]
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), app.state.config.model_name

    def chunk(i, delta, result, first_chunk=False) -> dict:
        if first_chunk:
            choices = [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                       for j in range(len(jobs))]
        else:
            choices = [{"index": i, "delta": {"content": delta} if delta else {}, "logprobs": None,
                        "finish_reason": _finish(result) if result else None}]
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if result is not None:
            out["epic"] = _epic([result])
        return out

    def body(results: list[GenerateResult], usage_only: bool = False) -> dict:
        if usage_only:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                    "usage": _usage(results, n)}
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                             "logprobs": _chat_logprobs(r), "finish_reason": _finish(r)} for i, r in enumerate(results)],
                "usage": _usage(results, n), "epic": _epic(results)}

    return await _run(http, jobs, chunk, body, bool((req.stream_options or {}).get("include_usage")), req.stream)


@router.post("/v1/completions")
async def completions(http: HTTPRequest):
    app = http.app
    req = validated(CompletionRequest, await json_body(http), "the completion body")
    if req.suffix:
        raise InvalidRequest("suffix is not supported")
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) else [req.prompt]
    if not prompts or len(prompts) > app.state.config.max_batch:
        raise InvalidRequest(f"a call holds 1 to {app.state.config.max_batch} prompts")
    params, n = _params(req, req.max_tokens, app.state.config)
    policy = app.state.resolver.policy_of(req.policy)
    resolver = app.state.resolver
    hints = resolver.hints(req.kv_hints)
    namespace = grant_of(http).namespace(req.namespace if req.namespace is not None else hints.get("namespace"))
    # echo with logprobs: the prompt's logprobs too, from its first token (OpenAI's `null` for it)
    logprobs = {"return_logprob": True, "top_logprobs_num": req.logprobs, "return_text_in_logprobs": True,
                "logprob_start_len": 0 if req.echo else -1} if req.logprobs is not None else None
    jobs, echoes = [], []
    for prompt in prompts:
        segments = await resolver.text_segments(prompt, hints, namespace) if isinstance(prompt, str) \
            else resolver.id_segments(prompt, hints)
        echo = (prompt if isinstance(prompt, str) else app.state.engine.tokenizer.decode(prompt)) if req.echo else ""
        for p in samples(params, n):
            jobs.append(engine_request(segments, policy, p, namespace, logprobs))
            echoes.append(echo)
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), app.state.config.model_name

    def chunk(i, delta, result, first_chunk=False) -> dict | None:
        if first_chunk:  # completions streams have no role chunk: start with the echo
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": j, "text": e, "logprobs": None, "finish_reason": None} for j, e in enumerate(echoes)]}
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": delta, "logprobs": None, "finish_reason": _finish(result) if result else None}]}

    def body(results: list[GenerateResult], usage_only: bool = False) -> dict:
        if usage_only:
            return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": [],
                    "usage": _usage(results, n)}
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": i, "text": echoes[i] + r.text, "logprobs": _completion_logprobs(r),
                             "finish_reason": _finish(r)} for i, r in enumerate(results)],
                "usage": _usage(results, n), "epic": _epic(results)}

    return await _run(http, jobs, chunk, body, bool((req.stream_options or {}).get("include_usage")), req.stream)


@router.get("/v1/models")
async def models(http: HTTPRequest) -> dict[str, Any]:
    cfg = http.app.state.config
    return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(http.app.state.started),
                                        "owned_by": "epic-sglang", "root": cfg.model,
                                        "max_model_len": http.app.state.engine.max_context_len}]}
