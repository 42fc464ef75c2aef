"""Request bodies for a SGLang server running the plugin (`/generate`, SGLang's native API).

A prompt is a list of `Segment`s (text and documents, already tokenized as the engine
does); the body carries its token ids and, for a caching policy, the link hint.
"""
from __future__ import annotations

from collections.abc import Sequence

from epic_sglang.link_plan import plan_link, segment_spans
from epic_sglang.policies import Policy, Segment, parse_policy
from epic_sglang.sglang_plugin.wire import LinkHint

def generate_body(segments: list[Segment], policy: str | Policy, sampling_params: dict,
                  namespace: str | None = None, **fields) -> dict:
    """The /generate body of one prompt under `policy`."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    body = {"input_ids": [t for s in segments for t in s.token_ids], "sampling_params": sampling_params, **fields}
    spans = [(start, start + length) for start, length, _ in segment_spans(segments)]
    if policy.kind == "fr" or not spans:
        if namespace is not None:
            body["extra_key"] = namespace
        return body
    body["extra_key"] = link_hint(policy, namespace, tuple(spans)).encode()
    return body


def link_hint(policy: Policy, namespace: str | None, docs: tuple[tuple[int, int], ...]) -> LinkHint:
    """The hint of a caching policy: legolink's k (querylink's head), legolink0's sinks,
    CacheBlend's percent, querylink's k, block and stride."""
    if policy.kind == "querylink":
        return LinkHint(namespace, docs, policy.head, query_k=policy.k, query_share=policy.ratio, block=policy.block,
                        stride=policy.stride)
    return LinkHint(namespace, docs, policy.k, sink=policy.recipe.sink_tokens,
                    blend=policy.ratio if policy.kind == "cacheblend" else 0.0)


def compile_bodies(segments: list[Segment], namespace: str | None = None, sinks: Sequence[int] = ()) -> list[dict]:
    """One prefill-only /generate body per document of the prompt: each leaves the
    document's KV in the server's cache. `sinks`: legolink0's throw-away tokens to compile
    each document behind (`PromptBuilder.sink_tokens`, as the engine does)."""
    hint = LinkHint(namespace, compile=True, sink=len(sinks)).encode()
    return [{"input_ids": [*sinks, *s.token_ids], "sampling_params": {"max_new_tokens": 0}, "extra_key": hint}
            for s in segments if s.document is not None]


def reused_whole(segments: list[Segment], policy: str | Policy, cached_tokens: int) -> bool:
    """Whether a response's `cached_tokens` covers every document token `policy` reuses: none
    of the prompt's documents was missing or evicted."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    return cached_tokens >= plan_link(policy, segments).reused_tokens


class CompiledDocuments:
    """The documents a client believes the server holds, compiled through it (per
    namespace and recipe: legolink0's documents are compiled behind sinks). A link response
    whose `cached_tokens` falls short of the reuse it planned shows that some were evicted:
    they are forgotten, so the next request compiles them again."""

    def __init__(self):
        self.known: set[tuple[str | None, str, tuple[int, ...]]] = set()

    def missing(self, segments: list[Segment], namespace: str | None = None, recipe: str = "plain") -> list[Segment]:
        return [s for s in segments if s.document is not None and (namespace, recipe, s.token_ids) not in self.known]

    def add(self, segments: list[Segment], namespace: str | None = None, recipe: str = "plain") -> None:
        self.known.update((namespace, recipe, s.token_ids) for s in segments if s.document is not None)

    def clear(self) -> None:
        """The server's cache was flushed: every document compiles again on next use."""
        self.known.clear()

    def confirm(self, segments: list[Segment], policy: str | Policy, cached_tokens: int,
                namespace: str | None = None) -> bool:
        """False (and the prompt's documents forgotten) when a document was not reused.
        An fr request reuses no document, so it shows nothing."""
        policy = parse_policy(policy) if isinstance(policy, str) else policy
        if reused_whole(segments, policy, cached_tokens):
            return True
        self.known.difference_update((namespace, policy.recipe.name, s.token_ids) for s in segments if s.document is not None)
        return False
