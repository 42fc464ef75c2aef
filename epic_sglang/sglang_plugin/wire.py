"""How a link plan travels through SGLang unchanged: in the request's `extra_key`.

SGLang carries `extra_key` from `/generate` to the scheduler's `Req` untouched (it is the
radix cache's namespace), so the plugin needs no new request field. A link request is
`extra_key = "epic:" + JSON` naming the tenant namespace, the documents' token spans
in `input_ids` and LegoLink's k; a compile request names only the namespace: its whole
`input_ids` is one document, prefilled alone at position 0. legolink0 adds `sink`: its
documents are compiled behind that many throw-away tokens (the compile request's first
`sink` input ids, whose KV is dropped) and linked from there. CacheBlend-r adds `blend`: r,
the percent of document tokens its check layer picks to recompute (`blend.py`). querylink-k adds
`q`: [k, block, stride] (querylink-p<r>: [0, block, stride, r]), its hint's `k` being the head
(the first tokens of each document always recomputed); its scout picks the rest in SGLang's
forward (`scout.py`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

PREFIX = "epic:"


class HintError(ValueError):
    """A malformed link hint (the request is refused with this message)."""


@dataclass(frozen=True)
class LinkHint:
    namespace: str | None
    docs: tuple[tuple[int, int], ...] = ()  # [start, end) token spans, sorted, disjoint
    k: int = 0  # LegoLink: first k tokens of each document recomputed (0 = naive)
    compile: bool = False  # this request compiles its input as one document
    sink: int = 0  # legolink0: documents compiled behind this many throw-away tokens
    blend: float = 0.0  # CacheBlend: percent of document tokens recomputed (0: not CacheBlend)
    query_k: int = 0  # querylink: legolink-query_k's document tokens, `k` of them each document's head
    query_share: float = 0.0  # querylink-p: that percent of the document tokens instead (both 0: not querylink)
    block: int = 1  # querylink: picks in aligned blocks of this many tokens
    stride: int = 1  # querylink: its scout scores every stride-th layer

    @property
    def querylink(self) -> bool:
        return bool(self.query_k or self.query_share)

    def encode(self) -> str:
        body = {"ns": self.namespace}
        if self.sink:
            body["sink"] = self.sink
        if self.blend:
            body["blend"] = self.blend
        if self.querylink:
            body["q"] = [self.query_k, self.block, self.stride] + ([self.query_share] if self.query_share else [])
        if self.compile:
            body["compile"] = True
        else:
            body.update(docs=[list(d) for d in self.docs], k=self.k)
        return PREFIX + json.dumps(body, separators=(",", ":"))

    def validate(self, num_tokens: int) -> None:
        if self.sink < 0:
            raise HintError(f"epic: sink must be >= 0, got {self.sink}")
        if self.compile:
            if num_tokens <= self.sink:
                raise HintError(f"epic: a compile request needs a non-empty document after its {self.sink} sink tokens")
            return
        if self.k < 0:
            raise HintError(f"epic: k must be >= 0, got {self.k}")
        if not 0 <= self.blend <= 100 or (self.blend and self.k):
            raise HintError(f"epic: blend must be a percent in (0, 100], without k; got blend {self.blend:g}, k {self.k}")
        budget_ok = (0 < self.query_share <= 100 and not self.query_k) if self.query_share else self.query_k >= self.k
        if self.querylink and (not budget_ok or self.blend or self.sink or self.block < 1 or self.stride < 1):
            raise HintError(f"epic: querylink needs q = [k >= head, block >= 1, stride >= 1] or [0, block, stride, "
                            f"percent in (0, 100]] without blend or sink; got q [{self.query_k}, {self.block}, "
                            f"{self.stride}, {self.query_share:g}], head {self.k}")
        if not self.docs:
            raise HintError("epic: a link request names no documents")
        prev_end = 0
        for start, end in self.docs:
            if not prev_end <= start < end <= num_tokens:
                raise HintError(f"epic: document span [{start}, {end}) is empty, overlaps the one before "
                                f"or lies outside the {num_tokens} input tokens")
            prev_end = end


def is_hint(extra_key: str | None) -> bool:
    return bool(extra_key) and extra_key.startswith(PREFIX)


def decode(extra_key: str) -> LinkHint:
    try:
        body = json.loads(extra_key[len(PREFIX):])
        ns = body.get("ns")
        if ns is not None and not isinstance(ns, str):
            raise HintError("epic: ns must be a string")
        sink = int(body.get("sink", 0))
        if body.get("compile"):
            return LinkHint(ns, compile=True, sink=sink)
        docs = tuple((int(s), int(e)) for s, e in body["docs"])
        q = body.get("q", (0, 1, 1))
        if len(q) not in (3, 4):
            raise HintError(f"epic: q must be [k, block, stride] or [0, block, stride, percent], got {q}")
        query_k, block, stride = (int(v) for v in q[:3])
        return LinkHint(ns, docs, int(body.get("k", 0)), sink=sink, blend=float(body.get("blend", 0)),
                        query_k=query_k, query_share=float(q[3]) if len(q) == 4 else 0.0, block=block, stride=stride)
    except HintError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HintError(f"epic: malformed link hint in extra_key ({e})") from None
