"""API input -> engine Requests: strict JSON, sampling params, and where the documents are
(explicit `kv_hints`, chat `documents`, or ingested documents found in the text)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from epic_sglang.document_spans import SegmentBuilder, spans_of_texts
from epic_sglang.engine import Request
from epic_sglang.errors import InvalidRequest, NotFound
from epic_sglang.policies import Segment, parse_policy
from epic_sglang.sampling import SamplingParams
from epic_sglang.server.access import OPEN, Grant
from epic_sglang.server.config import ServerConfig
from epic_sglang.server.documents import DocumentService
from retrieval.precompile import kv_namespace

KV_HINT_KEYS = {"spans", "doc_ids", "policy", "namespace", "transparent"}


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not a number this server takes: send finite numbers")


def parse_json(raw: bytes | str) -> Any:
    """Strict JSON: no NaN / Infinity, and every string valid Unicode (a lone surrogate such
    as "\\ud800" would fail later, in the tokenizer, as the server's error)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidRequest(f"malformed JSON body: {e}") from e
    _check_strings(body, "body")
    return body


def printable(text: str) -> str:
    """`text` with what UTF-8 cannot hold (lone surrogates a client sent) escaped: a message
    quoting the client's input must still go out."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_strings(value: Any, where: str) -> None:
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{printable(at)} holds a lone surrogate (not valid Unicode)") from None
        elif isinstance(v, dict):
            stack.extend((k, f"{at} (a key)") for k in v)
            stack.extend((x, f"{at}.{k}") for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))


async def json_body(http: HTTPRequest) -> Any:
    return parse_json(await http.body())


def validation_message(errors: list[dict]) -> str:
    """One line from pydantic's errors: `field.path: what is wrong`."""
    parts = [f"{'.'.join(str(x) for x in err['loc'] if x != 'body')}: {err['msg']}" for err in errors]
    return "; ".join(parts) or "invalid request"


def validated(model: type, body: Any, what: str):
    """A pydantic model of the body; its errors as one InvalidRequest line."""
    from pydantic import ValidationError

    if not isinstance(body, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise InvalidRequest(validation_message(e.errors())) from None


def require_object(body: Any, allowed: set[str], what: str) -> dict:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(sorted(unknown))} in {what}; supported: {', '.join(sorted(allowed))}")
    return body


def sampling_params(d: dict | None, config: ServerConfig) -> tuple[SamplingParams, int]:
    """(params, n) from SGLang-style sampling_params; n = parallel samples of one prompt."""
    if d is not None and not isinstance(d, dict):
        raise InvalidRequest("sampling_params must be a JSON object")
    d = dict(d or {})
    n = d.pop("n", None)
    n = 1 if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= config.max_n:
        raise InvalidRequest(f"n must be an integer in [1, {config.max_n}], got {n!r}")
    if d.get("max_new_tokens") is None:
        d["max_new_tokens"] = config.default_max_new_tokens
    return SamplingParams.from_dict(d), n


def samples(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies; with a seed, sample j uses seed + j so the samples differ but stay reproducible."""
    if n == 1:
        return [params]
    return [dataclasses.replace(params, seed=None if params.seed is None else (params.seed + j) % (1 << 64))
            for j in range(n)]


class PromptResolver:
    def __init__(self, config: ServerConfig, tokenizer, documents: DocumentService | None):
        self.config = config
        self.builder = SegmentBuilder(tokenizer)
        self.documents = documents

    def policy_of(self, name: str | None) -> str:
        policy = name or self.config.policy
        if not isinstance(policy, str):
            raise InvalidRequest(f"policy must be a string, got {policy!r}")
        parse_policy(policy)
        return policy

    async def text_segments(self, text: str, hints: dict, namespace: str, leading: bool = True) -> list[Segment]:
        """Segments of a text prompt: explicit spans, documents named by id, or transparent
        (documents of `namespace` only)."""
        if not isinstance(text, str) or not text:
            raise InvalidRequest("text must be a non-empty string")
        spans = self._spans(hints)
        if hints.get("doc_ids"):
            texts = await self.document_texts(hints["doc_ids"], namespace)
            spans += spans_of_texts(text, texts)
        elif not spans and hints.get("transparent", self.config.transparent_documents) and self.documents:
            spans = await self.documents.find_spans(text, namespace)
        return self.builder.from_text(text, spans, leading)

    def id_segments(self, ids: list[int], hints: dict) -> list[Segment]:
        if not isinstance(ids, list) or not ids or any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
            raise InvalidRequest("input_ids must be a non-empty list of integers")
        if hints.get("doc_ids"):
            raise InvalidRequest("kv_hints.doc_ids needs a text prompt; give token spans for input_ids")
        return self.builder.from_ids(ids, self._spans(hints))

    @staticmethod
    def _spans(hints: dict) -> list[tuple[int, int]]:
        spans = hints.get("spans") or []
        if not isinstance(spans, list) or any(not isinstance(sp, list) or len(sp) != 2 or
                                              any(not isinstance(x, int) or isinstance(x, bool) for x in sp)
                                              for sp in spans):
            raise InvalidRequest("kv_hints.spans must be a list of [start, end] integer pairs")
        return [tuple(sp) for sp in spans]

    async def document_texts(self, ids: list, namespace: str) -> list[str]:
        """Texts of the namespace's ingested documents by id (404 for an id it does not hold)."""
        if self.documents is None:
            raise InvalidRequest("this server has no document store (start it with --store)")
        if not isinstance(ids, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
            raise InvalidRequest("document ids must be a list of integers")
        if len(ids) > self.config.max_documents:
            raise InvalidRequest(f"at most {self.config.max_documents} documents per request, got {len(ids)}")
        found = await self.documents.get(ids, namespace)
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFound(f"unknown document id(s) in namespace {namespace!r}: {', '.join(map(str, missing))}")
        return [found[i].text for i in ids]

    def hints(self, hints: Any) -> dict:
        if hints is None:
            return {}
        require_object(hints, KV_HINT_KEYS, "kv_hints")
        if "transparent" in hints and not isinstance(hints["transparent"], bool):
            raise InvalidRequest("kv_hints.transparent must be true or false")
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


def engine_request(segments: list[Segment], policy: str, params: SamplingParams, namespace: str,
                   logprobs: dict | None = None) -> Request:
    """The engine's request; `namespace` is the API's (store) namespace, mapped to the engine's."""
    return Request(segments=segments, policy=policy, sampling=params, namespace=kv_namespace(namespace),
                   **(logprobs or {}))


def grant_of(http: HTTPRequest) -> Grant:
    """The caller's grant (the gate put it in the request's state)."""
    return getattr(http.state, "grant", None) or OPEN


def owner_of(http: HTTPRequest) -> str | None:
    """Who owns the caller's requests (may abort them by rid): None on an open server."""
    grant = grant_of(http)
    return None if grant is OPEN else grant.name


LOGPROB_ENTRY_BYTES = 64  # a [logprob, token id, text] entry, serialized, with room to spare


def check_response_size(requests: list[Request], config: ServerConfig) -> None:
    """Refuse, before any work, a request whose answer could exceed the response bound:
    its tokens times the logprob entries each carries."""
    entries = 0
    for r in requests:
        tokens = r.sampling.max_new_tokens
        if r.return_logprob:
            prompt = 0 if r.logprob_start_len < 0 else sum(len(s) for s in r.segments or [])
            tokens = (tokens + prompt) * (1 + r.top_logprobs_num)
        entries += tokens
    if entries * LOGPROB_ENTRY_BYTES > config.max_response_bytes:
        raise InvalidRequest(f"the answer could hold {entries:,} tokens and logprob entries, over this server's "
                             f"{config.max_response_bytes // LOGPROB_ENTRY_BYTES:,}: ask for fewer samples, "
                             "tokens or top logprobs")


async def json_response(build: Callable[[], Any]) -> Response:
    """A JSON response built and serialized off the event loop (a long answer with logprobs
    takes a while, and /health must answer meanwhile)."""
    return Response(await run_in_threadpool(lambda: json.dumps(build(), ensure_ascii=False)),
                    media_type="application/json")
