"""API input -> engine Requests: strict JSON, sampling params, and where the documents are
(explicit `kv_hints`, chat `documents`, or ingested documents found in the text)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, AsyncIterator

from starlette.requests import Request as HTTPRequest

from epic_sglang.document_spans import SegmentBuilder, spans_of_texts
from epic_sglang.engine import Request
from epic_sglang.policies import Segment, parse_policy
from epic_sglang.sampling import SamplingParams
from epic_sglang.server.config import ServerConfig
from epic_sglang.server.documents import DocumentService

KV_HINT_KEYS = {"spans", "doc_ids", "policy", "namespace", "transparent"}


class NotFound(ValueError):
    """A named thing (document id) does not exist: HTTP 404."""


async def json_body(http: HTTPRequest) -> Any:
    raw = await http.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON body: {e}") from e


def require_object(body: Any, allowed: set[str], what: str) -> dict:
    if not isinstance(body, dict):
        raise ValueError(f"{what} must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))} in {what}; supported: {', '.join(sorted(allowed))}")
    return body


def sampling_params(d: dict | None, config: ServerConfig) -> tuple[SamplingParams, int]:
    """(params, n) from SGLang-style sampling_params; n = parallel samples of one prompt."""
    d = dict(d or {})
    n = d.pop("n", None) or 1
    if not isinstance(n, int) or not 1 <= n <= config.max_n:
        raise ValueError(f"n must be an integer in [1, {config.max_n}], got {n!r}")
    if d.get("max_new_tokens") is None:
        d["max_new_tokens"] = config.default_max_new_tokens
    return SamplingParams.from_dict(d), n


def samples(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies; with a seed, sample j uses seed + j so the samples differ but stay reproducible."""
    if n == 1:
        return [params]
    return [dataclasses.replace(params, seed=None if params.seed is None else params.seed + j) for j in range(n)]


class PromptResolver:
    def __init__(self, config: ServerConfig, tokenizer, documents: DocumentService | None):
        self.config = config
        self.builder = SegmentBuilder(tokenizer)
        self.documents = documents

    def policy_of(self, name: str | None) -> str:
        policy = name or self.config.policy
        parse_policy(policy)
        return policy

    async def text_segments(self, text: str, hints: dict | None, leading: bool = True) -> list[Segment]:
        """Segments of a text prompt: explicit spans, documents named by id, or transparent."""
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
        hints = hints or {}
        spans = [tuple(s) if isinstance(s, list) else s for s in hints.get("spans") or []]
        if hints.get("doc_ids"):
            texts = await self.document_texts(hints["doc_ids"])
            spans += spans_of_texts(text, texts)
        elif not spans and hints.get("transparent", self.config.transparent_documents) and self.documents:
            spans = await self.documents.find_spans(text)
        return self.builder.from_text(text, spans, leading)

    def id_segments(self, ids: list[int], hints: dict | None) -> list[Segment]:
        if not isinstance(ids, list) or not ids or any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise ValueError("input_ids must be a non-empty list of integers")
        if (hints or {}).get("doc_ids"):
            raise ValueError("kv_hints.doc_ids needs a text prompt; give token spans for input_ids")
        return self.builder.from_ids(ids, [tuple(s) if isinstance(s, list) else s for s in (hints or {}).get("spans") or []])

    async def document_texts(self, ids: list) -> list[str]:
        """Texts of ingested documents by id (404 for an unknown one)."""
        if self.documents is None:
            raise ValueError("this server has no document store (start it with --store)")
        if not isinstance(ids, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
            raise ValueError("document ids must be a list of integers")
        if len(ids) > self.config.max_documents:
            raise ValueError(f"at most {self.config.max_documents} documents per request, got {len(ids)}")
        found = await self.documents.get(ids)
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFound(f"unknown document id(s): {', '.join(map(str, missing))}")
        return [found[i].text for i in ids]

    def hints(self, hints: Any) -> dict:
        if hints is None:
            return {}
        require_object(hints, KV_HINT_KEYS, "kv_hints")
        return hints


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's index;
    an error in one cancels the others and is raised."""
    queue: asyncio.Queue = asyncio.Queue()
    DONE = object()

    async def pump(i: int, it: AsyncIterator) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
            await queue.put((i, DONE))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is DONE:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def engine_request(segments: list[Segment], policy: str, params: SamplingParams, namespace: str | None,
                   logprobs: dict | None = None) -> Request:
    return Request(segments=segments, policy=policy, sampling=params, namespace=namespace, **(logprobs or {}))
