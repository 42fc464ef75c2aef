"""Link policies: their names, parameters and compile recipes, parsed from text.

What each policy recomputes is `epic_sglang.link_plan` (its table); the prompt is `Segment`s.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from epic_sglang.errors import InvalidRequest

DEFAULT_LEGOLINK_K = 16
DEFAULT_CACHEBLEND_RATIO = 15.0
LEGOLINK0_SINK_TOKENS = 4
CACHEBLEND_CHECK_LAYER = 1
# querylink: measured on HotpotQA (BENCHMARKS.md, "querylink design")
DEFAULT_QUERYLINK_BUDGET = 16
QUERYLINK_HEAD = 8  # first tokens of each document always recomputed (LegoLink's attention-sink fix)
QUERYLINK_BLOCK = 1  # picks in aligned blocks of this many tokens (1: single tokens)
QUERYLINK_STRIDE = 1  # the scout scores every stride-th layer (it runs them all)
POLICY_HELP = ("fr, naive, legolink-<k> (k >= 0), legolink0, cacheblend-<r> (0 < r <= 100), "
               "querylink-<k>[-h<head>][-b<block>][-s<stride>] (k >= 1, head <= k, block >= 1, stride >= 1), "
               "querylink-p<percent>[-h<head>][-b<block>][-s<stride>] (0 < percent <= 100)")


@dataclass(frozen=True)
class CompileRecipe:
    """How a document's KV is made; part of its cache key."""
    sink_tokens: int = 0  # throw-away tokens prefilled before the document, KV dropped

    @property
    def name(self) -> str:
        return f"sink{self.sink_tokens}" if self.sink_tokens else "plain"


@dataclass(frozen=True)
class Policy:
    kind: str  # fr | naive | legolink | legolink0 | cacheblend | querylink
    k: int = 0  # legolink: first tokens per document; querylink: document tokens per document, on average
    ratio: float = 0.0  # cacheblend: percent of document tokens; querylink-p: the same (its budget; k unused)
    head: int = QUERYLINK_HEAD  # querylink's fixed part of k (first tokens of each document)
    block: int = QUERYLINK_BLOCK
    stride: int = QUERYLINK_STRIDE

    @property
    def name(self) -> str:
        if self.kind == "legolink":
            return f"legolink-{self.k}"
        if self.kind == "cacheblend":
            return f"cacheblend-{self.ratio:g}"
        if self.kind == "querylink":
            extra = [f"h{self.head}" if self.head != self.default_head else "",
                     f"b{self.block}" if self.block != QUERYLINK_BLOCK else "",
                     f"s{self.stride}" if self.stride != QUERYLINK_STRIDE else ""]
            budget = f"p{self.ratio:g}" if self.ratio else str(self.k)
            return "-".join([f"querylink-{budget}"] + [e for e in extra if e])
        return self.kind

    @property
    def default_head(self) -> int:
        """querylink's head unless named: QUERYLINK_HEAD, at most k."""
        return QUERYLINK_HEAD if self.ratio else min(QUERYLINK_HEAD, self.k)

    @property
    def uses_document_cache(self) -> bool:
        return self.kind != "fr"

    @property
    def recipe(self) -> CompileRecipe:
        return CompileRecipe(LEGOLINK0_SINK_TOKENS if self.kind == "legolink0" else 0)


def parse_policy(text: str) -> Policy:
    """Parse `fr`, `naive`, `legolink`, `legolink-16`, `legolink0` / `legolink-0`, `cacheblend-15`."""
    s = str(text).strip().lower()
    if s in ("fr", "naive", "legolink0"):
        return Policy(s)
    m = re.fullmatch(r"legolink(?:-(-?\d+))?", s)
    if m:
        k = int(m.group(1)) if m.group(1) is not None else DEFAULT_LEGOLINK_K
        if k < 0:
            raise InvalidRequest(f"legolink k must be >= 0, got {k}")
        return Policy("legolink0") if k == 0 else Policy("legolink", k=k)
    m = re.fullmatch(r"cacheblend(?:-(-?[0-9.]+))?", s)
    if m:
        r = float(m.group(1)) if m.group(1) is not None else DEFAULT_CACHEBLEND_RATIO
        if not 0 < r <= 100:
            raise InvalidRequest(f"cacheblend ratio r must be in (0, 100], got {r:g}")
        return Policy("cacheblend", ratio=r)
    m = re.fullmatch(r"querylink(?:-(-?\d+)|-p(-?[0-9.]+))?(?:-h(-?\d+))?(?:-b(-?\d+))?(?:-s(-?\d+))?", s)
    if m:
        share = float(m.group(2)) if m.group(2) is not None else 0.0
        k = int(m.group(1)) if m.group(1) is not None else 0 if m.group(2) is not None else DEFAULT_QUERYLINK_BUDGET
        policy = Policy("querylink", k=k, ratio=share)
        head = int(m.group(3)) if m.group(3) is not None else policy.default_head
        block = int(m.group(4)) if m.group(4) is not None else QUERYLINK_BLOCK
        stride = int(m.group(5)) if m.group(5) is not None else QUERYLINK_STRIDE
        if m.group(2) is not None and not (0 < share <= 100 and head >= 0):
            raise InvalidRequest(f"querylink-p needs a percent in (0, 100] and head >= 0, got p{share:g}, head={head}")
        if m.group(2) is None and (k < 1 or not 0 <= head <= k):
            raise InvalidRequest(f"querylink needs k >= 1 and 0 <= head <= k, got k={k}, head={head}")
        if block < 1 or stride < 1:
            raise InvalidRequest(f"querylink needs block >= 1 and stride >= 1, got block={block}, stride={stride}")
        return Policy("querylink", k=k, ratio=share, head=head, block=block, stride=stride)
    raise InvalidRequest(f"unknown policy {text!r}; use one of: {POLICY_HELP}")


@dataclass(frozen=True)
class Segment:
    """A run of prompt tokens: a cached document, or text computed per request."""
    token_ids: tuple[int, ...]
    document: int | None = None  # index into the request's documents, or None for text

    def __len__(self) -> int:
        return len(self.token_ids)
