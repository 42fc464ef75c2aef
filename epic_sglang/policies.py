"""Link policies as pure functions: (policy, prompt segments) -> which positions to recompute.

| policy          | recomputed at link time                                          |
|-----------------|------------------------------------------------------------------|
| fr              | every token                                                      |
| naive           | every non-document token (prefix, question)                      |
| legolink-<k>    | the first k tokens of every document + every non-document token  |
| legolink0       | like naive, but documents are compiled behind throw-away sinks   |
| cacheblend-<r>  | all tokens in layers 0..1, then r% of document tokens (largest   |
|                 | KV deviation at layer 1) + every non-document token              |

The prompt's last token is always recomputed, even inside a document.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DEFAULT_LEGOLINK_K = 16
DEFAULT_CACHEBLEND_RATIO = 15.0
LEGOLINK0_SINK_TOKENS = 4
CACHEBLEND_CHECK_LAYER = 1
POLICY_HELP = "fr, naive, legolink-<k> (k >= 0), legolink0, cacheblend-<r> (0 < r <= 100)"


@dataclass(frozen=True)
class CompileRecipe:
    """How a document's KV is made; part of its cache key."""
    sink_tokens: int = 0  # throw-away tokens prefilled before the document, KV dropped

    @property
    def name(self) -> str:
        return f"sink{self.sink_tokens}" if self.sink_tokens else "plain"


@dataclass(frozen=True)
class Policy:
    kind: str  # fr | naive | legolink | legolink0 | cacheblend
    k: int = 0
    ratio: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "legolink":
            return f"legolink-{self.k}"
        if self.kind == "cacheblend":
            return f"cacheblend-{self.ratio:g}"
        return self.kind

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
            raise ValueError(f"legolink k must be >= 0, got {k}")
        return Policy("legolink0") if k == 0 else Policy("legolink", k=k)
    m = re.fullmatch(r"cacheblend(?:-(-?[0-9.]+))?", s)
    if m:
        r = float(m.group(1)) if m.group(1) is not None else DEFAULT_CACHEBLEND_RATIO
        if not 0 < r <= 100:
            raise ValueError(f"cacheblend ratio r must be in (0, 100], got {r:g}")
        return Policy("cacheblend", ratio=r)
    raise ValueError(f"unknown policy {text!r}; use one of: {POLICY_HELP}")


@dataclass(frozen=True)
class Segment:
    """A run of prompt tokens: a cached document, or text computed per request."""
    token_ids: tuple[int, ...]
    document: int | None = None  # index into the request's documents, or None for text

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class LinkPlan:
    recompute: torch.Tensor  # (n,) bool: positions computed in the link pass
    doc_spans: list[tuple[int, int, int]]  # (start, length, segment index) of reused documents
    blend_ratio: float = 0.0  # cacheblend: % of document tokens picked at the check layer

    @property
    def num_tokens(self) -> int:
        return self.recompute.numel()

    def document_mask(self) -> torch.Tensor:
        """(n,) bool: positions inside reused documents."""
        mask = torch.zeros_like(self.recompute)
        for start, length, _ in self.doc_spans:
            mask[start:start + length] = True
        return mask


def plan_link(policy: Policy, segments: list[Segment]) -> LinkPlan:
    n = sum(len(s) for s in segments)
    recompute = torch.zeros(n, dtype=torch.bool)
    spans, pos = [], 0
    for i, seg in enumerate(segments):
        if seg.document is not None and policy.uses_document_cache:
            spans.append((pos, len(seg), i))
            if policy.kind == "legolink":
                recompute[pos:pos + min(policy.k, len(seg))] = True
        else:
            recompute[pos:pos + len(seg)] = True
        pos += len(seg)
    recompute[-1] = True  # the first output token always comes from fresh logits
    return LinkPlan(recompute, spans, policy.ratio if policy.kind == "cacheblend" else 0.0)


def cacheblend_pick(deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (into `deviation`) of the ceil(ratio%) document tokens that deviate most."""
    count = min(deviation.numel(), -(-int(round(deviation.numel() * ratio * 1000)) // 100000))
    return torch.topk(deviation, count).indices.sort().values
