"""Link policies as pure functions: (policy, prompt segments) -> which positions to recompute.

| policy          | recomputed at link time                                          |
|-----------------|------------------------------------------------------------------|
| fr              | every token                                                      |
| naive           | every non-document token (prefix, question)                      |
| legolink-<k>    | the first k tokens of every document + every non-document token  |
| legolink0       | like naive, but documents are compiled behind throw-away sinks   |
| cacheblend-<r>  | all tokens in layers 0..1, then r% of document tokens (largest   |
|                 | KV deviation at layer 1) + every non-document token              |
| querylink-<k>   | legolink-k's number of document tokens, chosen by the question:  |
|                 | the first `head` of each document, the rest where a scout pass   |
|                 | of the question over the cached KV draws most (attention x value |
|                 | norm, over its layers) + every non-document token                |

The prompt's last token is always recomputed, even inside a document.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

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
               "querylink-<k>[-h<head>][-b<block>][-s<stride>] (k >= 1, head <= k, block >= 1, stride >= 1)")


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
    ratio: float = 0.0
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
            extra = [f"h{self.head}" if self.head != min(QUERYLINK_HEAD, self.k) else "",
                     f"b{self.block}" if self.block != QUERYLINK_BLOCK else "",
                     f"s{self.stride}" if self.stride != QUERYLINK_STRIDE else ""]
            return "-".join([f"querylink-{self.k}"] + [e for e in extra if e])
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
            raise InvalidRequest(f"legolink k must be >= 0, got {k}")
        return Policy("legolink0") if k == 0 else Policy("legolink", k=k)
    m = re.fullmatch(r"cacheblend(?:-(-?[0-9.]+))?", s)
    if m:
        r = float(m.group(1)) if m.group(1) is not None else DEFAULT_CACHEBLEND_RATIO
        if not 0 < r <= 100:
            raise InvalidRequest(f"cacheblend ratio r must be in (0, 100], got {r:g}")
        return Policy("cacheblend", ratio=r)
    m = re.fullmatch(r"querylink(?:-(-?\d+))?(?:-h(-?\d+))?(?:-b(-?\d+))?(?:-s(-?\d+))?", s)
    if m:
        k = int(m.group(1)) if m.group(1) is not None else DEFAULT_QUERYLINK_BUDGET
        head = int(m.group(2)) if m.group(2) is not None else min(QUERYLINK_HEAD, k)
        block = int(m.group(3)) if m.group(3) is not None else QUERYLINK_BLOCK
        stride = int(m.group(4)) if m.group(4) is not None else QUERYLINK_STRIDE
        if k < 1 or not 0 <= head <= k:
            raise InvalidRequest(f"querylink needs k >= 1 and 0 <= head <= k, got k={k}, head={head}")
        if block < 1 or stride < 1:
            raise InvalidRequest(f"querylink needs block >= 1 and stride >= 1, got block={block}, stride={stride}")
        return Policy("querylink", k=k, head=head, block=block, stride=stride)
    raise InvalidRequest(f"unknown policy {text!r}; use one of: {POLICY_HELP}")


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
    pick_budget: int = 0  # querylink: document tokens the scout pass still picks

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
    head = {"legolink": policy.k, "querylink": policy.head}.get(policy.kind, 0)
    for i, seg in enumerate(segments):
        if seg.document is not None and policy.uses_document_cache:
            spans.append((pos, len(seg), i))
            recompute[pos:pos + min(head, len(seg))] = True
        else:
            recompute[pos:pos + len(seg)] = True
        pos += len(seg)
    recompute[-1] = True  # the first output token always comes from fresh logits
    plan = LinkPlan(recompute, spans, policy.ratio if policy.kind == "cacheblend" else 0.0)
    if policy.kind == "querylink":
        # legolink-k's document tokens in all, less those already recomputed
        plan.pick_budget = sum(min(policy.k, n) - int(recompute[s:s + n].sum()) for s, n, _ in spans)
        plan.pick_budget = max(plan.pick_budget, 0)
    return plan


def cacheblend_pick(deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (into `deviation`) of the ceil(ratio%) document tokens that deviate most."""
    count = min(deviation.numel(), -(-int(round(deviation.numel() * ratio * 1000)) // 100000))
    return torch.topk(deviation, count).indices.sort().values


def querylink_pick(scores: torch.Tensor, plan: LinkPlan, block: int) -> torch.Tensor:
    """Positions (sorted) of the `plan.pick_budget` document tokens the question needs most:
    each document is cut into `block`-token blocks aligned to its start; a block's score is
    the attention mass (`scores`, one per prompt position) on its tokens not yet recomputed;
    blocks are taken in score order (ties: the earlier first) and the last one taken is cut
    to its best tokens so that exactly the budget is spent (or every candidate, if fewer).
    Vectorized: a 32K-token prompt has ~2,000 blocks."""
    scores = scores.float().cpu()
    if not plan.doc_spans or plan.pick_budget <= 0:
        return torch.zeros(0, dtype=torch.int64)
    pos = torch.cat([torch.arange(st, st + n) for st, n, _ in plan.doc_spans])
    first = torch.tensor([0] + [-(-n // block) for _, n, _ in plan.doc_spans]).cumsum(0)
    blk = torch.cat([torch.arange(n) // block + first[i] for i, (_, n, _) in enumerate(plan.doc_spans)])
    free = ~plan.recompute[pos]
    pos, blk = pos[free], blk[free]  # candidates, in position order; blocks numbered in position order
    mass = torch.zeros(int(first[-1]), dtype=torch.float64).index_add_(0, blk, scores[pos].double())
    count = torch.bincount(blk, minlength=mass.numel())
    order = torch.sort(mass, descending=True, stable=True).indices  # stable: ties keep position order
    order = order[count[order] > 0]
    before = torch.cumsum(count[order], 0) - count[order]  # candidates taken ahead of each block
    whole, partial = order[before + count[order] <= plan.pick_budget], order[before < plan.pick_budget]
    picked = [pos[torch.isin(blk, whole)]]
    if partial.numel() > whole.numel():  # the block that crosses the budget: its best tokens
        cut = partial[-1]
        left = plan.pick_budget - int(count[whole].sum())
        mine = pos[blk == cut]
        best = torch.sort(scores[mine], descending=True, stable=True).indices[:left]
        picked.append(mine[best])
    return torch.cat(picked).sort().values
