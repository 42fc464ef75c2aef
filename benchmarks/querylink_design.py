"""How querylink picks its tokens: selection rules at legolink-16's budget, compared by the
first token's fidelity to fr (KL and agreement) on HotpotQA. -> BENCHMARKS.md

    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1
    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1 --study budget
    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1 --study documents
    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1 --study sinks
    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1 --study rounds
    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1 --study oracle
    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1 --study temperature
    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1 --study offset
    python benchmarks/querylink_design.py --model qwen2.5-0.5b --n 40 --seed 1 --study error

Every rule recomputes the same number of document tokens as legolink-16 (its first 16 of
each document) and differs only in which: the first `head` of each document, then the
candidates a scout of the question scores highest. The scout runs the question over the
cached KV (with `scout head` > 0, also each document's first tokens, as legolink-h links);
its score of a token is the attention the question puts on it, summed over a range of
layers, optionally times the norm of the token's value. A random pick is the control. Each
rule's link is a plain link of its token set (naive's plan plus the set), so only the
choice differs. Seed 1 keeps these questions apart from the seed-0 accuracy runs.

`--study budget`: is the gap to fr a matter of how many tokens or of which? legolink-k's
first tokens against the shipped pick (8 first tokens, then attention x value norm over all
layers) at the document-token budgets of legolink-16 / -20 / -32 / -48, and at legolink-16's
budget the pick with each document's last 4 tokens recomputed too (the paper's init-final
variant) and with the scout that also recomputes the first 8 (a second pass over them).

`--study documents`: whole documents instead of scattered tokens: the documents the question's
attention (x value norm, all layers) weighs most, recomputed whole (each then attends to every
document before it, as in fr) while they fit the budget, the rest of the budget picked token by
token as the shipped rule does; every document keeps its first 8 tokens.

`--study sinks`: what the documents are compiled behind. Plain (alone, as legolink and
querylink compile them), behind 4 sink tokens (legolink0's recipe: the template's first token,
its KV dropped), and behind the prompt's own head (its system prompt and template tokens
before the first document, KV dropped: each document then sees what the first document sees
in fr; the benchmark gives the engine's sink recipe those tokens in a namespace of its own,
no such recipe is served). Each with no document token recomputed, with the first 16 of
each document, and with the shipped pick at legolink-16's budget (its scout over the same
documents).

`--study rounds`: the pick in two rounds: half the budget as the shipped rule picks it, then
the question scored again by a second scout that recomputes those picks too (their keys and
values now see the other documents), and the other half picked from that score.

`--study oracle`: is the gap a matter of how well the scout sees? The shipped pick against the
pick a perfect scout would make: the question's attention x value norm (all layers) in fr's own
forward, over every document token computed exactly, at the same budgets. If the perfect scout's
picks link no closer to fr, no better query-aware scoring can close the gap at this budget.

`--study temperature`: correct the reused KV instead of recomputing more (APE, arXiv 2502.05431):
every query's logits over the document tokens the link does not recompute are divided by a
temperature T (T < 1 sharpens) and their attention weight scaled by S (log S added to those
logits), as one more entry's log-sum-exp offset would do in the cascade; applied to
legolink-16's first tokens and to the shipped pick at its budget, a grid of T and S.

`--study offset`: correct the reused KV by its mean error: per layer, the reused document tokens
the link does not recompute get K and V shifted by a mean difference between fresh and cached
KV (per KV head and dim, keys before RoPE). Oracle: the mean over those very tokens of fr's KV
minus the cache's (what a perfect per-layer offset could do). Online: the mean over the document
tokens the link does recompute, their fresh KV in this link minus their cached KV (known in the
link pass at each layer, before its attention). Offsets on V alone, K alone, or both.

`--study error`: pick by what is wrong in the cache rather than by what the question reads
(CacheBlend's criterion, with perfect knowledge): each document token's error is its cached K
and V (before RoPE) against fr's at every layer, ||dK|| + ||dV||, each layer's normalized by its
mean over the prompt's document tokens. Oracles, at the same budgets as the shipped pick (its 8
first tokens kept): the error alone; the error the question sees (per layer, the question's
attention to the token in fr's own forward x its ||dV||, summed); and the same with the
scout's attention (what a served policy could see, if it knew the error). If no error oracle
links closer to fr than the shipped pick, no estimate of the error can.

`--answer-tokens N` (every study but sinks): each rule judged on fr's whole greedy answer (up to N
tokens), not its first token: the answer appended to the prompt and scored teacher-forced, each
answer token's log-probability under the rule's link against under fr, and how often the rule's
top token is fr's; the first answer token is the first-token proxy's. A rule can keep fr's first
token and drift later (querylink-16 on the H200: 65% of first tokens fr's, 54% of all greedy ones).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_ttft import link_of, linked  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from epic_sglang import Engine, Request, SamplingParams  # noqa: E402
from epic_sglang.attention.torch_ref import TorchReferenceAttention  # noqa: E402
from epic_sglang.evaluation import SYSTEM, paired_interval, sample_questions  # noqa: E402
from epic_sglang.forward_batch import ForwardBatch  # noqa: E402
from epic_sglang.link_plan import LinkPlan, plan_link, querylink_pick  # noqa: E402
from epic_sglang.models.rope import apply_rotation  # noqa: E402
from epic_sglang.policies import Segment, parse_policy  # noqa: E402
from epic_sglang.scout_attention import ScoutAttention, ScoutSeq, scout_layer_torch  # noqa: E402


class PerLayerScout(ScoutAttention):
    """The scout's attention over every layer, keeping each layer's mass apart, and beside it
    the attention alone (the same, over values of norm 1)."""

    def __init__(self, seq: ScoutSeq, num_layers: int):
        super().__init__([seq], set(range(num_layers)))
        self.weighted: list[torch.Tensor] = []
        self.plain: list[torch.Tensor] = []
        self.unit: torch.Tensor | None = None  # values of norm 1, the pool's shape

    def forward(self, q: torch.Tensor, layer: int, pool, batch: ForwardBatch) -> torch.Tensor:
        s = self.seqs[0]
        before = s.mass.clone()
        out = super().forward(q, layer, pool, batch)
        self.weighted.append((s.mass - before).sum(0))
        unit = replace(s, mass=torch.zeros_like(s.mass))
        if self.unit is None:
            values = pool.get_value_buffer(layer)
            self.unit = torch.full_like(values, values.shape[-1] ** -0.5)
        scout_layer_torch(apply_rotation(q[s.q_start:s.q_end], *s.q_rope), pool.get_key_buffer(layer), self.unit, unit, True)
        self.plain.append(unit.mass.sum(0))
        return out


def per_layer_scores(engine: Engine, segs: list[Segment], scout_head: int, policy: str | None = None,
                     namespace: str | None = None, extra: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, n) attention mass and (layers, n) attention x value norm of the question,
    the scout recomputing the question and each document's first `scout_head` tokens (or
    what `policy` recomputes, over documents of its recipe in `namespace`), and `extra`."""
    policy = policy or (f"legolink-{scout_head}" if scout_head else "naive")
    s = engine.admit(Request(segments=segs, policy=policy, namespace=namespace,
                             sampling=SamplingParams(max_new_tokens=1)))
    if extra is not None:
        s.plan.recompute[extra] = True
    engine.prefill([s])
    try:
        part = engine._link_part(s)
        start, length, _ = s.plan.doc_spans[-1]
        positions = part[1].tolist()
        seq = ScoutSeq.build(0, positions, [p >= start + length for p in positions], part[3],
                             engine.config.num_kv_heads, engine.linker.rotary)
        scout = PerLayerScout(seq, engine.config.num_layers)
        engine.linker.run_scout(ForwardBatch.build([part]), scout)
        return torch.stack(scout.plain).cpu(), torch.stack(scout.weighted).cpu()
    finally:
        engine.finish(s)


def top(score: torch.Tensor, candidates: torch.Tensor, budget: int) -> torch.Tensor:
    return torch.topk(score.masked_fill(~candidates, float("-inf")), budget).indices


def rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, torch.Tensor]:
    """Each rule's recomputed positions."""
    layers = engine.config.num_layers
    lego = plan_link(parse_policy("legolink-16"), segs)
    docs = lego.document_mask()
    budget16 = int((lego.recompute & docs).sum())
    out = {"legolink-16 (first 16 of each document)": lego.recompute.nonzero().flatten()}
    scouts = {h: per_layer_scores(engine, segs, h) for h in (0, 8)}
    for head in (4, 8):
        base = plan_link(parse_policy(f"legolink-{head}"), segs).recompute
        budget, cand = budget16 - int((base & docs).sum()), docs & ~base
        for scout_head, (plain, weighted) in scouts.items():
            if scout_head not in (0, head):
                continue
            for what, scores in (("attention", plain), ("attention x value norm", weighted)):
                for name, rows in (("all layers", slice(None)), ("first half", slice(0, layers // 2)),
                                   ("second half", slice(layers // 2, None))):
                    out[f"head {head}, scout head {scout_head}: {what}, {name}"] = \
                        torch.cat([base.nonzero().flatten(), top(scores[rows].sum(0), cand, budget)])
        if head == 8:  # the shipped rule, but in aligned 4-token blocks (fewer, longer runs in the link)
            policy = parse_policy("querylink-16-b4")
            plan = plan_link(policy, segs)
            out["head 8, scout head 0: attention x value norm, all layers, 4-token blocks"] = torch.cat(
                [base.nonzero().flatten(), querylink_pick(scouts[0][1].sum(0), plan, policy.block)])
        g = torch.Generator().manual_seed(seed)
        out[f"head {head}: random picks (control)"] = torch.cat(
            [base.nonzero().flatten(), top(torch.rand(len(docs), generator=g), cand, budget)])
    return out


def budget_rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, torch.Tensor]:
    """`--study budget`'s rules: each one's recomputed positions."""
    del seed  # no random control here
    docs = plan_link(parse_policy("legolink-16"), segs).document_mask()
    base = plan_link(parse_policy("legolink-8"), segs).recompute
    cand = docs & ~base
    weighted = {h: per_layer_scores(engine, segs, h)[1].sum(0) for h in (0, 8)}
    out = {}
    for k in (16, 20, 32, 48):
        lego = plan_link(parse_policy(f"legolink-{k}"), segs).recompute
        budget = int((lego & docs).sum()) - int((base & docs).sum())
        out[f"legolink-{k}"] = lego.nonzero().flatten()
        out[f"pick at legolink-{k}'s budget"] = torch.cat(
            [base.nonzero().flatten(), top(weighted[0], cand, budget)])
        if k == 16:
            out["pick at legolink-16's budget, scout recomputes the first 8"] = torch.cat(
                [base.nonzero().flatten(), top(weighted[8], cand, budget)])
            last = torch.zeros_like(docs)
            for start, length, _ in plan_link(parse_policy("legolink-16"), segs).doc_spans:
                last[start + max(length - 4, 8):start + length] = True
            final = base | last
            out["pick at legolink-16's budget with each document's last 4"] = torch.cat(
                [final.nonzero().flatten(), top(weighted[0], docs & ~final, budget - int((last & ~base).sum()))])
    return out


def top_documents(score: torch.Tensor, plan, base: torch.Tensor, budget: int, most: int) -> torch.Tensor:
    """(n,) bool: base, plus up to `most` whole documents in order of the mass `score` puts on
    them while they fit `budget` new tokens, plus the rest of the budget in single-token picks."""
    chosen, left = base.clone(), budget
    spans = sorted(plan.doc_spans, key=lambda sp: -float(score[sp[0]:sp[0] + sp[1]].sum()))
    for start, length, _ in spans[:most]:
        new = int((~chosen[start:start + length]).sum())
        if new <= left:
            chosen[start:start + length], left = True, left - new
    docs = plan.document_mask()
    if left > 0:
        chosen[top(score, docs & ~chosen, left)] = True
    return chosen


def against_the_pick(engine: Engine, segs: list[Segment], variants) -> dict[str, torch.Tensor]:
    """legolink-16 and the shipped pick at legolink-16's and -20's budgets (8 first tokens kept,
    the question-only scout's attention x value norm over all layers), then `variants(k,
    budget, plan, docs, base, score)`'s rules at each budget: each rule's recomputed positions."""
    lego16 = plan_link(parse_policy("legolink-16"), segs)
    docs = lego16.document_mask()
    base = plan_link(parse_policy("legolink-8"), segs).recompute
    score = per_layer_scores(engine, segs, 0)[1].sum(0)
    out = {"legolink-16": lego16.recompute.nonzero().flatten()}
    for k in (16, 20):
        budget = int((plan_link(parse_policy(f"legolink-{k}"), segs).recompute & docs).sum()) - int((base & docs).sum())
        out[f"pick at legolink-{k}'s budget"] = torch.cat([base.nonzero().flatten(), top(score, docs & ~base, budget)])
        out.update(variants(k, budget, lego16, docs, base, score))
    return out


def document_rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, torch.Tensor]:
    """`--study documents`'s rules."""
    del seed

    def whole(k: int, budget: int, plan: LinkPlan, docs: torch.Tensor, base: torch.Tensor, score: torch.Tensor):
        out = {}
        for most in (1, 10):
            name = "the top document" if most == 1 else "top documents"
            out[f"{name} whole, then picks, at legolink-{k}'s budget"] = \
                top_documents(score, plan, base, budget, most).nonzero().flatten()
        return out

    return against_the_pick(engine, segs, whole)


class HeadSinks:
    """The engine's sink recipe with the prompt's head as its tokens (see `--study sinks`)."""

    def __init__(self, engine: Engine):
        self.prompts, self.head = engine.prompts, []
        engine.prompts = self

    def __getattr__(self, name: str):
        return getattr(self.prompts, name)

    def sink_tokens(self, count: int) -> list[int]:
        return list(self.head) if count and self.head else self.prompts.sink_tokens(count)


def link_with(engine: Engine, segs: list[Segment], positions: torch.Tensor, policy: str,
              namespace: str | None) -> tuple[torch.Tensor, int]:
    """First-token logits of `policy`'s link (its recipe's documents) recomputing `positions`
    too, and how many tokens it recomputes."""
    r, recomputed = linked(engine, Request(segments=segs, policy=policy, namespace=namespace, return_first_logits=True,
                                           sampling=SamplingParams(max_new_tokens=1, ignore_eos=True)), positions)
    return r.first_logits, recomputed


def sink_rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, torch.Tensor]:
    """`--study sinks`'s rules: each one's first-token logits and tokens recomputed (their
    links differ in recipe, not only in positions)."""
    del seed
    sinks = engine.prompts if isinstance(engine.prompts, HeadSinks) else HeadSinks(engine)
    head = list(segs[0].token_ids) if segs[0].document is None else []
    lego16 = plan_link(parse_policy("legolink-16"), segs)
    docs = lego16.document_mask()
    base = plan_link(parse_policy("legolink-8"), segs).recompute
    budget = int((lego16.recompute & docs).sum()) - int((base & docs).sum())
    first16 = (lego16.recompute & docs).nonzero().flatten()
    out = {}
    for recipe, policy, namespace in (("plain", "naive", None), ("4 sinks", "legolink0", None),
                                      ("the prompt's head", "legolink0", "head-sinks")):
        sinks.head = head if namespace else []  # the head only for its own namespace's documents
        score = per_layer_scores(engine, segs, 0, policy, namespace)[1].sum(0)
        picks = torch.cat([base.nonzero().flatten(), top(score, docs & ~base, budget)])
        for what, positions in (("no document token", torch.zeros(0, dtype=torch.int64)),
                                ("first 16 of each document", first16), ("pick at legolink-16's budget", picks)):
            out[f"behind {recipe}: {what}"] = link_with(engine, segs, positions, policy, namespace)
    sinks.head = []
    return out


def round_rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, torch.Tensor]:
    """`--study rounds`'s rules."""
    del seed

    def two_rounds(k: int, budget: int, plan: LinkPlan, docs: torch.Tensor, base: torch.Tensor, score: torch.Tensor):
        kept, half = base.nonzero().flatten(), top(score, docs & ~base, budget // 2)
        again = per_layer_scores(engine, segs, 0, extra=torch.cat([kept, half]))[1].sum(0)
        taken = base.clone()
        taken[half] = True
        return {f"pick at legolink-{k}'s budget, two rounds": torch.cat(
            [kept, half, top(again, docs & ~taken, budget - budget // 2)])}

    return against_the_pick(engine, segs, two_rounds)


def oracle_rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, torch.Tensor]:
    """`--study oracle`'s rules."""
    del seed
    # a scout that computes every document token too is fr's own forward: the question's
    # attention over exact KV (what a perfect scout would see)
    every = plan_link(parse_policy("naive"), segs).document_mask().nonzero().flatten()
    oracle = per_layer_scores(engine, segs, 0, extra=every)[1].sum(0)

    def exact(k: int, budget: int, plan: LinkPlan, docs: torch.Tensor, base: torch.Tensor, score: torch.Tensor):
        return {f"pick by fr's own attention at legolink-{k}'s budget (oracle)": torch.cat(
            [base.nonzero().flatten(), top(oracle, docs & ~base, budget)])}

    return against_the_pick(engine, segs, exact)


class EditedAttention(TorchReferenceAttention):
    """The reference attention with a link's keys (before RoPE) and values edited by `edit`,
    which may also add a bias to their logits; dense sequences (a document's compile, fr's
    capture) attend as usual."""

    def __init__(self, base: TorchReferenceAttention):
        self.__dict__.update(base.__dict__)

    def edit(self, k: torch.Tensor, v: torch.Tensor, layer: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def keys_values(self, pool, layer: int, s, mask: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        k, v, mask = super().keys_values(pool, layer, s, mask)
        if s.dense:
            return k, v, mask
        k, v, bias = self.edit(k.clone(), v.clone(), layer)
        if bias is not None:
            allowed = mask.get("attn_mask", torch.ones(s.num_queries, k.shape[0], dtype=torch.bool, device=k.device))
            mask = {"attn_mask": torch.where(allowed, bias[None, :], float("-inf"))}
        return k, v, mask


class TemperedAttention(EditedAttention):
    """The logits of a link's stale keys (the positions `stale` marks: reused document tokens
    not recomputed) divided by `temperature` and shifted by log `scale`."""

    def __init__(self, base: TorchReferenceAttention, stale: torch.Tensor, temperature: float, scale: float):
        super().__init__(base)
        self.stale, self.temperature, self.scale_weight = stale, temperature, scale

    def edit(self, k: torch.Tensor, v: torch.Tensor, layer: int):
        stale = F.pad(self.stale, (0, k.shape[0] - len(self.stale))).to(k.device)  # decode: new keys are fresh
        bias = torch.where(stale, torch.tensor(self.scale_weight).log(), torch.tensor(0.0)).to(k.dtype)
        return torch.where(stale[:, None, None], k / self.temperature, k), v, bias


def edited_links(engine: Engine, segs: list[Segment]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """What the correction studies edit: the document mask, naive's recomputed positions, and
    the positions legolink-16 and the shipped pick at its budget recompute beyond naive's."""
    lego16 = plan_link(parse_policy("legolink-16"), segs)
    docs = lego16.document_mask()
    base = plan_link(parse_policy("legolink-8"), segs).recompute
    budget = int((lego16.recompute & docs).sum()) - int((base & docs).sum())
    score = per_layer_scores(engine, segs, 0)[1].sum(0)
    return docs, plan_link(parse_policy("naive"), segs).recompute, {
        "legolink-16": (lego16.recompute & docs).nonzero().flatten(),
        "pick at legolink-16's budget": torch.cat([base.nonzero().flatten(), top(score, docs & ~base, budget)])}


def link_with_attention(engine: Engine, segs: list[Segment], attn, positions: torch.Tensor) -> torch.Tensor:
    """`link_of` with `attn` as the engine's attention for that link only."""
    plain, engine.linker.attn = engine.linker.attn, attn
    try:
        return link_of(engine, segs, positions)
    finally:
        engine.linker.attn = plain


def temperature_rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, tuple[torch.Tensor, int]]:
    """`--study temperature`'s rules: each one's first-token logits and tokens recomputed."""
    del seed
    docs, naive, links = edited_links(engine, segs)
    plain = engine.linker.attn
    out = {}
    for name, positions in links.items():
        recomputed = naive.clone()
        recomputed[positions] = True
        grid = [(1.0, 1.0)] + [(t, c) for t in (0.95, 1.0, 1.05) for c in (0.5, 0.7, 1.0) if (t, c) != (1.0, 1.0)]
        for temperature, scale in grid:  # T 1, S 1 first: the plain link, the rows' baseline
            attn = TemperedAttention(plain, docs & ~recomputed, temperature, scale)
            out[f"{name}, T {temperature:g}, S {scale:g}"] = (link_with_attention(engine, segs, attn, positions),
                                                               int(recomputed.sum()))
    return out


class CapturedAttention(TorchReferenceAttention):
    """The reference attention, keeping each layer's un-rotated K and V of the prompt's
    sequence (`length` keys: a document's compile is not kept)."""

    def __init__(self, base: TorchReferenceAttention, length: int):
        self.__dict__.update(base.__dict__)
        self.length, self.k, self.v = length, {}, {}

    def keys_values(self, pool, layer: int, s, mask: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        k, v, mask = super().keys_values(pool, layer, s, mask)
        if s.kv_slots.numel() == self.length:
            self.k[layer], self.v[layer] = k.clone(), v.clone()
        return k, v, mask


class OffsetAttention(EditedAttention):
    """A link's stale keys' K and/or V (before RoPE) shifted by a per-layer offset: `oracle`
    fr's mean error over the stale tokens, else the mean error of the recomputed document
    tokens in this very link (their KV now minus `cached`)."""

    def __init__(self, base: TorchReferenceAttention, stale: torch.Tensor, fresh_docs: torch.Tensor,
                 cached: CapturedAttention, exact: CapturedAttention | None, which: str):
        super().__init__(base)
        self.stale, self.fresh_docs, self.cached, self.exact, self.which = stale, fresh_docs, cached, exact, which

    def edit(self, k: torch.Tensor, v: torch.Tensor, layer: int):
        n, stale, fresh = len(self.stale), self.stale, self.fresh_docs
        ck, cv = self.cached.k[layer], self.cached.v[layer]
        if self.exact is not None:  # the oracle: fr's error over the stale tokens themselves
            dk = (self.exact.k[layer][stale] - ck[stale]).mean(0)
            dv = (self.exact.v[layer][stale] - cv[stale]).mean(0)
        else:  # online: the recomputed document tokens' error in this link
            dk = (k[:n][fresh] - ck[fresh]).mean(0)
            dv = (v[:n][fresh] - cv[fresh]).mean(0)
        if "k" in self.which:
            k[:n][stale] += dk
        if "v" in self.which:
            v[:n][stale] += dv
        return k, v, None


def offset_rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, tuple[torch.Tensor, int]]:
    """`--study offset`'s rules: each one's first-token logits and tokens recomputed."""
    del seed
    docs, naive, links = edited_links(engine, segs)
    plain, n = engine.linker.attn, len(docs)

    def run(attn, positions):
        return link_with_attention(engine, segs, attn, positions)

    cached, exact = CapturedAttention(plain, n), CapturedAttention(plain, n)
    run(cached, torch.zeros(0, dtype=torch.int64))  # naive: every document token read from the cache
    run(exact, docs.nonzero().flatten())  # every token computed: fr's KV
    out = {}
    for name, positions in links.items():
        recomputed = naive.clone()
        recomputed[positions] = True
        out[f"{name}, no offset"] = (run(plain, positions), int(recomputed.sum()))
        for source, oracle in (("oracle", exact), ("online", None)):
            for which in ("v", "k", "kv"):
                attn = OffsetAttention(plain, docs & ~recomputed, docs & recomputed, cached, oracle, which)
                out[f"{name}, {source} offset on {which.upper()}"] = (run(attn, positions), int(recomputed.sum()))
    return out


def error_rules(engine: Engine, segs: list[Segment], seed: int) -> dict[str, torch.Tensor]:
    """`--study error`'s rules."""
    del seed
    plain, n = engine.linker.attn, sum(len(seg) for seg in segs)
    cached, exact = CapturedAttention(plain, n), CapturedAttention(plain, n)
    link_with_attention(engine, segs, cached, torch.zeros(0, dtype=torch.int64))  # naive: the cache's KV
    docs = plan_link(parse_policy("naive"), segs).document_mask()
    link_with_attention(engine, segs, exact, docs.nonzero().flatten())  # every token computed: fr's KV
    layers = sorted(cached.k)
    dk = torch.stack([(exact.k[i] - cached.k[i]).flatten(1).norm(dim=1) for i in layers])  # (layers, n)
    dv = torch.stack([(exact.v[i] - cached.v[i]).flatten(1).norm(dim=1) for i in layers])
    per_layer = lambda d: d / d[:, docs].mean(1, keepdim=True).clamp(min=1e-12)  # noqa: E731
    error = (per_layer(dk) + per_layer(dv)).sum(0)
    every = docs.nonzero().flatten()
    fr_attention = per_layer_scores(engine, segs, 0, extra=every)[0]  # (layers, n): the question's, in fr
    scout_attention = per_layer_scores(engine, segs, 0)[0]
    scores = {"the cache's KV error (oracle)": error,
              "fr's attention x the value error (oracle)": (fr_attention * dv).sum(0),
              "the scout's attention x the value error (oracle error)": (scout_attention * dv).sum(0)}

    def by_error(k: int, budget: int, plan: LinkPlan, docs: torch.Tensor, base: torch.Tensor, score: torch.Tensor):
        return {f"pick by {what} at legolink-{k}'s budget": torch.cat([base.nonzero().flatten(),
                                                                       top(rule, docs & ~base, budget)])
                for what, rule in scores.items()}

    return against_the_pick(engine, segs, by_error)


def forced_of(engine: Engine, segs: list[Segment], positions: torch.Tensor | None, answer: list[int],
              policy: str = "naive") -> tuple[list[float], list[bool]]:
    """`answer` after the prompt, teacher-forced, through a link recomputing `positions` (naive's
    plan plus them; `policy` fr: everything): each answer token's log-probability, and whether
    it is the link's top token."""
    tail = segs[-1]
    if tail.document is not None:
        raise ValueError("the prompt must end with text (the question) for the answer to follow it")
    n = sum(len(seg) for seg in segs)
    r, _ = linked(engine, Request(segments=segs[:-1] + [Segment(tail.token_ids + tuple(answer))], policy=policy,
                                  return_logprob=True, logprob_start_len=n, top_logprobs_num=1,
                                  sampling=SamplingParams(max_new_tokens=1, ignore_eos=True)), positions)
    chosen = r.input_token_logprobs
    return [lp for lp, _, _ in chosen], [top[0][1] == t for top, (_, t, _) in zip(r.input_top_logprobs, chosen)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--study", choices=("pick", "budget", "documents", "sinks", "rounds", "oracle", "temperature", "offset", "error"),
                    default="pick")
    ap.add_argument("--answer-tokens", type=int, default=0,
                    help="judge each rule on fr's greedy answer (up to N tokens), teacher-forced; 0: the first token")
    args = ap.parse_args()
    if args.answer_tokens and args.study in ("sinks", "temperature", "offset"):
        sys.exit(f"--answer-tokens: not with --study {args.study} (its rules link their own way); pick another study")
    study = {"pick": rules, "budget": budget_rules, "documents": document_rules, "sinks": sink_rules,
             "rounds": round_rules, "oracle": oracle_rules, "temperature": temperature_rules,
             "offset": offset_rules, "error": error_rules}[args.study]
    engine = Engine(args.model, device=args.device)
    kl: dict[str, list[float]] = {}
    agree: dict[str, list[float]] = {}
    share: dict[str, list[float]] = {}
    first_agree: dict[str, list[float]] = {}  # --answer-tokens: the first answer token = fr's
    for i, ex in enumerate(sample_questions(args.n, args.seed)):
        segs = engine.prompts.build(ex.question, list(ex.documents), SYSTEM)
        fr = engine.generate_batch([Request(segments=segs, policy="fr", sampling=SamplingParams(max_new_tokens=1),
                                            return_first_logits=True)])[0]
        ref = torch.log_softmax(fr.first_logits, -1)
        n = sum(len(seg) for seg in segs)
        if args.answer_tokens:
            answer = engine.generate_batch([Request(segments=segs, policy="fr", sampling=SamplingParams(
                max_new_tokens=args.answer_tokens))])[0].output_ids
            fr_logprobs, _ = forced_of(engine, segs, None, answer, "fr")
        for name, positions in study(engine, segs, i).items():
            if isinstance(positions, tuple):  # the rule's own link: its logits and tokens recomputed
                logits, recomputed = positions
            elif args.answer_tokens:
                logprobs, tops = forced_of(engine, segs, positions, answer)
                kl.setdefault(name, []).append(sum(a - b for a, b in zip(fr_logprobs, logprobs)) / len(answer))
                agree.setdefault(name, []).append(sum(tops) / len(tops))
                first_agree.setdefault(name, []).append(float(tops[0]))
                share.setdefault(name, []).append(len(positions) / n)
                continue
            else:
                logits, recomputed = link_of(engine, segs, positions), len(positions)
            logp = torch.log_softmax(logits, -1)
            kl.setdefault(name, []).append(float((ref.exp() * (ref - logp)).sum()))
            agree.setdefault(name, []).append(float(logp.argmax() == ref.argmax()))
            share.setdefault(name, []).append(recomputed / n)
        print(f"{i + 1}/{args.n}", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    first = "rule (legolink-16's budget)" if args.study == "pick" else "rule (document-token budget)"
    base = next((k for k in kl if k.startswith("legolink-16")), None)

    def versus(name: str) -> str:  # the per-question difference to legolink-16, paired bootstrap
        if base is None or name == base:
            return "-"
        return "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired_interval([x - y for x, y in zip(kl[name], kl[base])]))

    if args.answer_tokens:
        lines = [f"| {first} | recomputed % of the prompt | fr's answer: log-prob lost per token (nats) "
                 "| minus legolink-16's [95% paired] | answer tokens = fr's top % | first token = fr's % |",
                 "|---|---|---|---|---|---|"]
        for name in sorted(kl, key=lambda k: mean(kl[k])):
            lines.append(f"| {name} | {100 * mean(share[name]):.1f} | {mean(kl[name]):.4f} | {versus(name)} "
                         f"| {100 * mean(agree[name]):.1f} | {100 * mean(first_agree[name]):.1f} |")
    else:
        lines = [f"| {first} | recomputed % of the prompt | KL(fr \\|\\| rule), first token "
                 "| minus legolink-16's [95% paired] | first token = fr's % |", "|---|---|---|---|---|"]
        for name in sorted(kl, key=lambda k: mean(kl[k])):
            lines.append(f"| {name} | {100 * mean(share[name]):.1f} | {mean(kl[name]):.4f} | {versus(name)} "
                         f"| {100 * mean(agree[name]):.1f} |")
    what = {"pick": "which document tokens to recompute", "budget": "how many document tokens to recompute",
            "documents": "whole documents or single tokens", "sinks": "what documents are compiled behind",
            "rounds": "one round of picks or two", "oracle": "the scout's picks or a perfect scout's",
            "temperature": "attention temperature on the reused KV",
            "offset": "the reused KV shifted by its mean error",
            "error": "picks by the cache's error (oracles)"}[args.study]
    paragraph = __doc__.split(chr(10) + chr(10))[
        {"pick": 2, "budget": 3, "documents": 4, "sinks": 5, "rounds": 6, "oracle": 7, "temperature": 8,
         "offset": 9, "error": 10}[args.study]]
    judged = ""
    if args.answer_tokens:
        what += f", judged on fr's answer (up to {args.answer_tokens} tokens)"
        judged = " " + __doc__.split(chr(10) + chr(10))[11]
    body = f"""## querylink design: {what} ({args.model}, HotpotQA, n = {args.n})

Machine: {machine()}. Seeded questions (seed {args.seed}, apart from the accuracy runs' seed 0). {paragraph}{judged}

{chr(10).join(lines)}
"""
    write_section(f"querylink-design-{args.model}" + ("" if args.study == "pick" else f"-{args.study}")
                  + (f"-answer{args.answer_tokens}" if args.answer_tokens else ""), body)
    print(body)


if __name__ == "__main__":
    main()
