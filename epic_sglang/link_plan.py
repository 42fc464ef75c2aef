"""The link plan: which prompt tokens a link recomputes, the runs they form, and the attention
entries that give each recomputed query exactly the keys at or before it.

Pure functions of (policy, segments, cached documents) and tuning arguments, no device
state. The in-process engine (`engine.py`, `attention/flashinfer_backend.py`: the runs and
their cascade entries), the SGLang plugin (`sglang_plugin/layout.py`: the recomputed
positions, the reused runs and the queries after each) and the plugin client's reuse
accounting (`sglang_plugin/client.py`) all call these, so the rule is written once.

| policy          | recomputed at link time                                          |
|-----------------|------------------------------------------------------------------|
| fr              | every token                                                      |
| naive           | every non-document token (prefix, question)                      |
| legolink-<k>    | the first k tokens of every document + every non-document token  |
| legolink0       | like naive, but documents are compiled behind throw-away sinks   |
| cacheblend-<r>  | all tokens in layers 0..1, then r% of document tokens (largest   |
|                 | KV deviation at layer 1) + every non-document token              |
| querylink-<k>   | legolink-k's number of document tokens (querylink-p<r>: r% of   |
|                 | them), chosen by the question:                                   |
|                 | the first `head` of each document, the rest where a scout pass   |
|                 | of the question over the cached KV draws most (attention x value |
|                 | norm, over its layers) + every non-document token                |

The prompt's last token is always recomputed, even inside a document (the first output
token comes from fresh logits).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from epic_sglang.policies import Policy, Segment

Span = tuple[int, int, int]  # (start, length, id) of a reused document in the prompt
Entry = tuple[int, int, int, int]  # query rows [q0, q1), keys [k0, k1), all sequence-local


@dataclass(frozen=True)
class CascadeTuning:
    """How a long link's attention is cut into entries (measured on an H200, BENCHMARKS.md)."""
    # runs grouped until this many queries share one non-causal bulk (FA3) entry
    group: int = 128
    # bulk keys per entry. FA3 schedules (query tile, head) items whole, so at 16K the last
    # group's ~15K keys took one CTA while the CTAs averaged ~8.7K; chunks balance them
    # (4,096 measured best at 16K and 32K: benchmarks/gpu_link_attention.py)
    chunk: int = 4096
    # `auto` cascades once the runs' key prefixes add up to this many keys (per-run entries
    # would re-read them all); below, the cascade's second kernel and merge cost more host
    # time than they save: per-run entries won at 8K-token links (62K run keys), cascade at
    # 16K (255K), in the engine and in the SGLang plugin alike
    auto_keys: int = 1 << 17
    # a cascade whose groups hold more query runs than this on average (querylink's and
    # CacheBlend's scattered picks: ~70 a group) attends each group's local keys in one
    # position-masked Triton entry per tile of queries (`local_attention`), not one causal
    # FA2 entry per run (legolink-16: 8 runs a group)
    masked_runs: int = 16

    def masks_local(self, local_entries: int, groups: int) -> bool:
        """Whether a cascade's local entries (one per query run) over `groups` groups attend
        as position-masked tiles (`masked_runs`)."""
        return local_entries > self.masked_runs * groups


GATHER_PAGE = 16  # keys gathered in prompt order into a scratch are read by the kernels in pages of this many


@dataclass
class LinkPlan:
    recompute: torch.Tensor  # (n,) bool: positions computed in the link pass
    doc_spans: list[Span]  # reused documents; the id is the caller's (segment or document index)
    blend_ratio: float = 0.0  # cacheblend: % of document tokens picked at the check layer
    pick_budget: int = 0  # querylink: document tokens the scout pass still picks

    @property
    def num_tokens(self) -> int:
        return self.recompute.numel()

    @property
    def document_tokens(self) -> int:
        """Tokens inside reused documents."""
        return sum(length for _, length, _ in self.doc_spans)

    def document_mask(self) -> torch.Tensor:
        """(n,) bool: positions inside reused documents."""
        mask = torch.zeros_like(self.recompute)
        for start, length, _ in self.doc_spans:
            mask[start:start + length] = True
        return mask

    @property
    def reused_tokens(self) -> int:
        """Document tokens read from the cache, not recomputed, less the picks still to come
        (CacheBlend's at its check layer, querylink's `pick_budget` after its scout)."""
        reused = int((self.document_mask() & ~self.recompute).sum()) - self.pick_budget
        if self.blend_ratio:
            reused -= share_count(self.document_tokens, self.blend_ratio)
        return max(reused, 0)

    def reused_runs(self) -> list[tuple[int, int, int, int]]:
        """Maximal runs of reused tokens, each inside one document: (start, length, document
        id, offset of `start` inside the document), in prompt order."""
        reused, runs = (~self.recompute).numpy(), []
        for start, length, doc in self.doc_spans:
            for first, end in consecutive_runs(np.flatnonzero(reused[start:start + length])):
                runs.append((start + first, end - first, doc, first))
        return runs


def consecutive_runs(values: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers (sorted `values`) as [first, end) ranges.
    Vectorized: the scheduler plans a 32K-token prompt's runs on its critical path."""
    v = np.asarray(values, dtype=np.int64)
    if not v.size:
        return []
    cuts = np.flatnonzero(np.diff(v) != 1) + 1
    firsts, lasts = v[np.concatenate([[0], cuts])], v[np.concatenate([cuts - 1, [v.size - 1]])]
    return list(zip(firsts.tolist(), (lasts + 1).tolist()))


def concat_ranges(starts: Sequence[int] | np.ndarray, ends: Sequence[int] | np.ndarray) -> np.ndarray:
    """int64: the ranges [starts[i], ends[i]) back to back, without a Python loop over them."""
    starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    lens = ends - starts
    return np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(starts - (np.cumsum(lens) - lens), lens)


def segment_spans(segments: Sequence[Segment]) -> list[Span]:
    """(start, length, segment index) of every document segment."""
    spans, pos = [], 0
    for i, seg in enumerate(segments):
        if seg.document is not None:
            spans.append((pos, len(seg), i))
        pos += len(seg)
    return spans


def plan_spans(num_tokens: int, doc_spans: Sequence[Span], head: int) -> LinkPlan:
    """The plan of a prompt of `num_tokens` tokens whose reused documents are `doc_spans`:
    each document's first `head` tokens recomputed, every token outside them, and the last."""
    recompute = torch.ones(num_tokens, dtype=torch.bool)
    for start, length, _ in doc_spans:
        recompute[start + min(head, length):start + length] = False
    recompute[-1] = True
    return LinkPlan(recompute, list(doc_spans))


def plan_link(policy: Policy, segments: Sequence[Segment]) -> LinkPlan:
    """The policy's plan for the prompt (fr: every token; querylink: its picks come later,
    from the scout, within `pick_budget`)."""
    n = sum(len(s) for s in segments)
    spans = segment_spans(segments) if policy.uses_document_cache else []
    plan = plan_spans(n, spans, {"legolink": policy.k, "querylink": policy.head}.get(policy.kind, 0))
    plan.blend_ratio = policy.ratio if policy.kind == "cacheblend" else 0.0
    if policy.kind == "querylink":
        plan.pick_budget = querylink_budget(plan, policy.k, policy.ratio)
    return plan


def querylink_budget(plan: LinkPlan, k: int, share: float = 0.0) -> int:
    """How many document tokens querylink's scout picks on top of `plan` (its heads): querylink-k,
    legolink-k's document tokens in all; querylink-p`share`, `share_count` of them (whatever the
    documents' lengths); less those already recomputed."""
    recomputed = sum(int(plan.recompute[s:s + length].sum()) for s, length, _ in plan.doc_spans)
    if share:
        return max(share_count(plan.document_tokens, share) - recomputed, 0)
    return max(sum(min(k, length) for _, length, _ in plan.doc_spans) - recomputed, 0)


def share_count(doc_tokens: int, ratio: float) -> int:
    """ceil(ratio%) of `doc_tokens` document tokens: how many CacheBlend-`ratio` and
    querylink-p`ratio` recompute."""
    return min(doc_tokens, -(-int(round(doc_tokens * ratio * 1000)) // 100000))


def cacheblend_pick(deviation: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (into `deviation`, one per document token) of the `share_count` that
    deviate most, sorted."""
    return torch.topk(deviation, share_count(deviation.numel(), ratio)).indices.sort().values


def querylink_pick(scores: torch.Tensor, plan: LinkPlan, block: int) -> torch.Tensor:
    """Positions (sorted) of the `plan.pick_budget` document tokens the question needs most:
    each document is cut into `block`-token blocks aligned to its start; a block's score is
    the attention mass (`scores`, one per prompt position) on its tokens not yet recomputed;
    blocks are taken in score order (ties: the earlier first) and the last one taken is cut
    to its best tokens so that exactly the budget is spent (or every candidate, if fewer).
    On the host in numpy, after one copy of `scores`: a 32K-token prompt has ~32,000 blocks
    of one token, of which only the budget's worth are ordered (the pick sits between the
    scout and the link, with the GPU idle)."""
    if not plan.doc_spans or plan.pick_budget <= 0:
        return torch.zeros(0, dtype=torch.int64)
    scores = scores.detach().float().cpu().numpy().astype(np.float64)
    budget = plan.pick_budget
    starts, lens = (np.array(v, dtype=np.int64) for v in zip(*[(st, n) for st, n, _ in plan.doc_spans]))
    blocks_of = -(-lens // block)
    first = np.concatenate([[0], np.cumsum(blocks_of)])
    pos = concat_ranges(starts, starts + lens)
    blk = (pos - np.repeat(starts, lens)) // block + np.repeat(first[:-1], lens)
    free = ~plan.recompute.numpy()[pos]
    pos, blk = pos[free], blk[free]  # candidates, in position order; blocks numbered in position order
    mass = np.bincount(blk, weights=scores[pos], minlength=int(first[-1]))
    count = np.bincount(blk, minlength=int(first[-1]))
    live = np.flatnonzero(count)
    # every block holds a candidate, so the budget is spent within its first `budget` blocks
    order = live[_largest_first(mass[live], min(budget, live.size))]
    before = np.cumsum(count[order]) - count[order]  # candidates taken ahead of each block
    whole, partial = order[before + count[order] <= budget], order[before < budget]
    picked = [pos[np.isin(blk, whole)]]
    if partial.size > whole.size:  # the block that crosses the budget: its best tokens
        mine = pos[blk == partial[-1]]
        picked.append(mine[_largest_first(scores[mine], budget - int(count[whole].sum()))])
    return torch.from_numpy(np.sort(np.concatenate(picked)))


def scout_queries(plan: LinkPlan, computed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """querylink's scout among the `computed` prompt positions (ascending, the prompt's last
    among them): which it computes (bool over `computed`: those outside the documents, and the
    last even inside one) and which of those it scores (the question: after the last document;
    the last token if none)."""
    scouted = ~plan.document_mask().numpy()[computed]
    scouted[-1] = True
    tail = max((start + length for start, length, _ in plan.doc_spans), default=0)
    scored = computed[scouted] >= tail
    if not scored.any():
        scored[-1] = True
    return scouted, scored


def querylink_stand_in(plan: LinkPlan) -> torch.Tensor:
    """`plan.pick_budget` picks made without a scout: legolink's order (every document's next
    token after its head, then the one after, ...; the earlier document first), so with the
    heads they are legolink-k's tokens. What a runtime plans a querylink row with before its
    scout has run (the count is the picks')."""
    scores = torch.zeros(plan.num_tokens, dtype=torch.float64)
    for start, length, _ in plan.doc_spans:
        scores[start:start + length] = -torch.arange(length, dtype=torch.float64)
    return querylink_pick(scores, plan, 1)


def with_picks(plan: LinkPlan, picks: torch.Tensor) -> LinkPlan:
    """`plan` with the document tokens `picks` recomputed too: the budget spent."""
    recompute = plan.recompute.clone()
    recompute[picks] = True
    return LinkPlan(recompute, list(plan.doc_spans), plan.blend_ratio)


def _largest_first(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest `values`, largest first, ties in index order: a stable
    descending sort's first `k`, without sorting the rest."""
    if k >= values.size:
        return np.argsort(-values, kind="stable")
    kth = np.partition(values, values.size - k)[values.size - k]
    above = np.flatnonzero(values > kth)
    chosen = np.concatenate([above, np.flatnonzero(values == kth)[:k - above.size]])
    return chosen[np.lexsort((chosen, -values[chosen]))]


# ----------------------------------------------------------------- attention entries
def query_runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """`consecutive_runs` of the queries' positions, as (index just past the run, position
    just past the run): the run's query count so far and its truncated KV length."""
    out, count = [], 0
    for first, end in consecutive_runs(positions):
        count += end - first
        out.append((count, end))
    return out


def run_query_starts(runs: Sequence[tuple[int, int]], positions: Sequence[int]) -> list[int]:
    """For each reused run (start, length): the index of the first of the queries' (sorted)
    `positions` past it. A run is reused and the queries are computed, so every query lies
    wholly before a run or wholly after it: the queries from that index on attend the whole
    run, the ones before it none of it."""
    return [bisect.bisect_left(positions, start + length) for start, length in runs]


def run_groups(docs: Sequence[int], starts: Sequence[int], queries: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Entries over reused runs that take each query once per document (where a document's
    runs share one rotation, as in the SGLang plugin: their document's shift): `docs`, each
    run's document (prompt order); `starts`, `run_query_starts`; `queries`, how many. Returns
    arrays (first, end, q0, q1), one entry each: runs [first, end) of one document, read by
    queries [q0, q1). A query reads every run before it, each once: those of a document it
    follows whole in one entry with the document's later queries, those of the document it
    sits in (querylink's picks between runs) in an entry of the runs before it."""
    docs, starts = np.asarray(docs, dtype=np.int64), np.asarray(starts, dtype=np.int64)
    n = len(docs)
    if not n:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    index = np.arange(n)
    opens = np.concatenate([[True], docs[1:] != docs[:-1]])
    closes = np.concatenate([docs[1:] != docs[:-1], [True]])
    first = np.maximum.accumulate(np.where(opens, index, 0))
    q1 = np.where(closes, queries, np.concatenate([starts[1:], [queries]]))  # up to the next run's readers
    keep = q1 > starts
    return first[keep], index[keep] + 1, starts[keep], q1[keep]


def wants_cascade(runs: list[tuple[int, int]], tuning: CascadeTuning) -> bool:
    """`auto`'s choice for these runs (`query_runs`' output): cascade once their key
    prefixes add up to `tuning.auto_keys`."""
    return sum(end for _, end in runs) >= tuning.auto_keys


def link_entries(runs: list[tuple[int, int]], page: int, group: int | None) -> tuple[list[Entry], list[Entry]]:
    """(bulk, local) attention entries that together give each query exactly the keys at or
    before its position. `group` None: one causal local entry per run over keys [0, end).
    Otherwise runs are grouped until `group` queries; a group's queries all see the keys
    before its first run, so they share one non-causal bulk entry over [0, a) (a: that
    start rounded down to a page) and each run keeps a causal local entry over [a, end),
    which starts on a page as paged entries must. The two results merge by log-sum-exp."""
    bulk, local = [], []
    group_start = a = 0  # the current group's first query row; its bulk keys are [0, a)
    for i, (count, end) in enumerate(runs):
        start = runs[i - 1][0] if i else 0
        if group is not None and (i == 0 or start - group_start >= group):
            if a:
                bulk.append((group_start, start, 0, a))
            group_start, a = start, (end - (count - start)) // page * page
        local.append((start, count, a, end))
    if a:
        bulk.append((group_start, runs[-1][0], 0, a))
    return bulk, local


def split_keys(entries: list[Entry], chunk: int) -> list[Entry]:
    """Each entry's keys in pieces of at most `chunk` (a whole number of pages), same queries."""
    return [(q0, q1, k, min(k + chunk, k1)) for q0, q1, k0, k1 in entries for k in range(k0, k1, chunk)]


def attention_entries(runs: list[tuple[int, int]], page: int,
                      cascade: CascadeTuning | None) -> tuple[list[Entry], list[Entry]]:
    """(bulk, local) entries of a link's runs: `cascade` None, one causal entry per run (no
    bulk); else the cascade's groups, their bulk keys in `cascade.chunk`-key entries."""
    if cascade is None:
        return link_entries(runs, page, None)
    bulk, local = link_entries(runs, page, cascade.group)
    return split_keys(bulk, cascade.chunk), local
