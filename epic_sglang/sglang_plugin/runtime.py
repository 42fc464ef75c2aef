"""Our HTTP API over a SGLang server that runs the plugin.

`SGLangRuntime` has the in-process `Runtime`'s interface (stream a `Request`, `call` a
function of the engine), so the same routes (/v1/rag, /v1/documents) serve either engine. A
request is built into segments exactly as the engine builds them (`PromptBuilder`); the
documents the server does not hold yet are compiled first (one compile request each, shared
by every later prompt), then the prompt goes to SGLang's /generate as token ids with the
link hint, streamed back as `Progress`.

What SGLang reports is less than the engine's stats: `cached_tokens` counts every prompt
token whose KV came from a cache (the exact prefix and the reused document tokens), so
`reused_tokens` is that count and `recomputed_tokens` the rest of the prompt.

Prompt logprobs (`logprob_start_len`) need the exact prompt's KV, which the plugin does not
link: such a request goes as `fr` (SGLang's own prefix cache, no compile), and its result
says so in `policy`. (The in-process engine instead recomputes from logprob_start_len on.)
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import asdict
from typing import Any, AsyncIterator, Callable

import httpx

from epic_sglang.engine import GenerateResult, GenerateStats, Request
from epic_sglang.policies import Policy, Segment, parse_policy
from epic_sglang.prompt import PromptBuilder
from epic_sglang.sampling import SamplingParams
from epic_sglang.scheduler import Progress
from epic_sglang.server.runtime import RequestFailed
from epic_sglang.sglang_plugin.client import CompiledDocuments, compile_bodies, generate_body


def sglang_sampling(params: SamplingParams) -> dict:
    """Our sampling parameters under SGLang's names (they share all but two)."""
    out = {k: v for k, v in asdict(params).items() if k != "seed" and v is not None}
    out["top_k"] = params.top_k if params.top_k > 0 else -1  # SGLang: -1 = no cut
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    return out


class SGLangEngine:
    """What routes reach through the app state and `Runtime.call`: the tokenizer, the prompt
    builder, the context length, and compiling documents on the SGLang server."""

    def __init__(self, url: str, tokenizer, max_context_len: int, api_key: str | None = None,
                 timeout_s: float = 600):
        self.tokenizer, self.max_context_len = tokenizer, max_context_len
        self.prompts = PromptBuilder(tokenizer)
        self.compiled = CompiledDocuments()
        self._lock = asyncio.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s)

    async def post(self, body: dict) -> dict:
        return check(await self.forward("POST", "/generate", body)).json()

    async def forward(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """One of SGLang's own routes, answered as SGLang answers it (the front's proxy)."""
        try:
            return await self.http.request(method, path, json=body)
        except httpx.HTTPError as err:
            raise self.unreachable(err) from err

    def unreachable(self, err: httpx.HTTPError) -> RequestFailed:
        return RequestFailed(f"SGLang server unreachable at {self.http.base_url}: {err!r}", status=503)

    async def compile_missing(self, segments: list[Segment], policy: Policy, namespace: str | None) -> int:
        """Compile the prompt's documents the server is not known to hold under the
        policy's recipe (legolink0: behind the engine's sink tokens); their tokens."""
        recipe = policy.recipe
        sinks = self.prompts.sink_tokens(recipe.sink_tokens)
        async with self._lock:  # two requests with one new document compile it once
            missing = self.compiled.missing(segments, namespace, recipe.name)
            await asyncio.gather(*(self.post(b) for b in compile_bodies(missing, namespace, sinks)))
            self.compiled.add(missing, namespace, recipe.name)
        return sum(len(s) for s in missing)

    async def compile(self, texts: list[str], policy: str, namespace: str | None = None) -> int:
        """/v1/documents' precompile: documents compiled ahead of their first question."""
        segments = [Segment(self.prompts.encode_document(t), document=i) for i, t in enumerate(texts)]
        return await self.compile_missing(segments, parse_policy(policy), namespace)

    async def close(self) -> None:
        await self.http.aclose()


def check(response: httpx.Response) -> httpx.Response:
    """SGLang's refusals become our 400s; anything else it fails with, a failed request."""
    if response.is_success:
        return response
    try:
        message = response.json().get("error", {}).get("message") or response.text
    except (ValueError, AttributeError):
        message = response.text
    if 400 <= response.status_code < 500:
        raise ValueError(f"SGLang refused the request: {message}")
    raise RequestFailed(f"SGLang failed ({response.status_code}): {message}")


def wants_prompt_logprobs(request: Request) -> bool:
    return request.return_logprob and request.logprob_start_len >= 0


def sglang_logprobs(request: Request, meta: dict) -> dict:
    """The logprobs from SGLang's last stream chunk (it carries them all) under
    GenerateResult's names; SGLang's shapes are the engine's."""
    if not request.return_logprob:
        return {}
    sides = ("input", "output") if wants_prompt_logprobs(request) else ("output",)
    out = {f"{side}_token_logprobs": meta.get(f"{side}_token_logprobs", []) for side in sides}
    if request.top_logprobs_num:
        out |= {f"{side}_top_logprobs": meta.get(f"{side}_top_logprobs", []) for side in sides}
    return out


def owner_rid(owner: str | None, rid: str) -> str:
    """The rid SGLang sees: the client's under its owner's name."""
    return rid if owner is None else f"{owner}/{rid}"


class SGLangRuntime:
    def __init__(self, engine: SGLangEngine, on_result: Callable[[GenerateResult], None] | None = None):
        self.engine = engine
        self.on_result = on_result

    async def stream(self, request: Request, rid: str | None = None, http=None,
                     owner: str | None = None) -> AsyncIterator[Progress]:
        """Progress per streamed chunk; bad requests raise InvalidRequest before the first
        item. SGLang sees the rid under its owner (`owner_rid`), so an /abort_request through
        the front reaches only the caller's own requests."""
        e, t0 = self.engine, time.perf_counter()
        policy = parse_policy(request.policy)
        request.sampling.validate()
        if wants_prompt_logprobs(request):
            policy = parse_policy("fr")  # the exact prompt (module docstring)
        segments = request.segments or e.prompts.build(request.question, request.documents, request.system)
        prompt_ids = [t for s in segments for t in s.token_ids]
        rid = rid or uuid.uuid4().hex
        logprobs = dict(return_logprob=True, top_logprobs_num=request.top_logprobs_num,
                        return_text_in_logprobs=request.return_text_in_logprobs) if request.return_logprob else {}
        if wants_prompt_logprobs(request):
            logprobs["logprob_start_len"] = request.logprob_start_len
        body = generate_body(segments, policy, sglang_sampling(request.sampling), request.namespace,
                             stream=True, rid=owner_rid(owner, rid), **logprobs)  # refuses policies it does not serve
        compiled = 0 if policy.kind == "fr" else await e.compile_missing(segments, policy, request.namespace)
        compile_s = time.perf_counter() - t0
        try:
            async with e.http.stream("POST", "/generate", json=body) as response:
                if not response.is_success:
                    await response.aread()
                    check(response)
                first_at, chunk = None, None
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        raise RequestFailed(f"SGLang: {chunk['error']}")
                    first_at = first_at or time.perf_counter()
                    yield Progress(rid, chunk["text"], chunk.get("output_ids", []), len(prompt_ids))
        except httpx.HTTPError as err:
            raise e.unreachable(err) from err
        if chunk is None:
            raise RequestFailed("SGLang closed the stream without an answer")
        meta = chunk["meta_info"]
        cached = int(meta.get("cached_tokens", 0))
        e.compiled.confirm(segments, policy, cached, request.namespace)  # forget evicted documents
        ttft = (first_at or time.perf_counter()) - t0
        stats = GenerateStats(prompt_tokens=len(prompt_ids), reused_tokens=cached,
                              recomputed_tokens=len(prompt_ids) - cached, compiled_tokens=compiled,
                              ttft_s=ttft, compile_s=compile_s, link_s=ttft - compile_s,
                              decode_s=time.perf_counter() - t0 - ttft)
        result = GenerateResult(chunk["text"], chunk.get("output_ids", []), prompt_ids, meta.get("finish_reason") or {},
                                policy.name, stats, recomputed_positions=[], **sglang_logprobs(request, meta))
        if self.on_result is not None:
            self.on_result(result)
        yield Progress(rid, result.text, result.output_ids, len(prompt_ids), result=result)

    async def generate(self, request: Request, rid: str | None = None, http=None,
                       owner: str | None = None) -> GenerateResult | None:
        async for p in self.stream(request, rid, http, owner):
            if p.result is not None:
                return p.result
        return None

    async def call(self, fn: Callable[[SGLangEngine], Any]) -> Any:
        """fn(engine), awaited when it is a coroutine (compile is)."""
        out = fn(self.engine)
        return await out if asyncio.iscoroutine(out) else out
