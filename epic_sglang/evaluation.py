"""Accuracy of every link policy through one engine: HotpotQA (distractor setting) and a
needle in a haystack.

HotpotQA: each of a question's 10 paragraphs is one document, compiled alone; prompt =
system + 10 documents + question; greedy decoding; answer F1 / exact match (the standard
HotpotQA normalization). Needle: Paul Graham essays in 512-token documents with one needle
sentence (`epic_sglang.data.needle`); score = the needle's value recovered. Per policy also
the fidelity to `fr`: first-token agreement, greedy token agreement, and the KL divergence of
the first token's distribution from fr's.

Each batch holds several questions with all their policies (one compile pass, one link
pass, batched decode). Results are appended to a JSON-lines file as they come, so an
interrupted run resumes.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from epic_sglang.data.hotpotqa import load_hotpotqa, packed_seed
from epic_sglang.data.needle import needle_examples, recovered
from epic_sglang.engine import Engine, Request
from epic_sglang.policies import parse_policy
from epic_sglang.sampling import SamplingParams

SYSTEM = ("Answer the question using the documents. Reply with the answer only (a few words, "
          "or yes / no), with no explanation.")
NEEDLE_SYSTEM = "Answer the question using the documents. Reply with the answer only."
DEFAULT_POLICIES = ["fr", "naive", "legolink0", "legolink-1", "legolink-2", "legolink-4", "legolink-8",
                    "legolink-16", "legolink-32", "cacheblend-5", "cacheblend-15", "querylink-16"]
NEEDLE_LENGTHS = [2048, 4096, 8192, 16384]


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_exact(prediction: str, gold: str) -> tuple[float, float]:
    """HotpotQA's answer F1 and exact match."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    em = float(pred == ref)
    if pred in ("yes", "no", "noanswer") or ref in ("yes", "no", "noanswer"):
        return (em, em)
    common = Counter(pred.split()) & Counter(ref.split())
    same = sum(common.values())
    if same == 0:
        return 0.0, em
    precision, recall = same / len(pred.split()), same / len(ref.split())
    return 2 * precision * recall / (precision + recall), em


def token_agreement(a: list[int], b: list[int]) -> float:
    """Share of positions where two greedy outputs hold the same token (length gaps disagree)."""
    if not a and not b:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))


@dataclass
class EvalRow:
    qid: str
    policy: str
    answer: str
    prediction: str
    f1: float
    em: float
    first_token_agree: float
    token_agree: float
    kl_first: float
    recompute_fraction: float
    prompt_tokens: int


@dataclass(frozen=True)
class EvalExample:
    id: str
    question: str
    documents: tuple[str, ...]
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    system: str
    score: Callable[[str, str], tuple[float, float]]  # (prediction, answer) -> (F1 or hit, exact or hit)
    max_new_tokens: int


TASKS = {"hotpotqa": Task("hotpotqa", SYSTEM, f1_exact, 32), "needle": Task("needle", NEEDLE_SYSTEM, recovered, 16)}


def sample_questions(n: int, seed: int) -> list[EvalExample]:
    """HotpotQA: the n questions whose ids hash lowest under the seed. A larger n extends a
    smaller run instead of redrawing it, and a data file trimmed to those questions
    (`epic_sglang.data.pack`) gives the same sample."""
    questions, packed = load_hotpotqa(), packed_seed()
    if n > len(questions):  # e.g. a packed data file with fewer: a smaller run would pass for this one
        raise ValueError(f"the HotpotQA data holds {len(questions)} questions, fewer than n = {n}: ask for fewer, "
                         f"or pack more (python -m epic_sglang.data.pack DIR --n {n})")
    if packed is not None and packed != seed:  # its questions are another seed's sample
        raise ValueError(f"the HotpotQA data is packed for seed {packed}, not {seed}: "
                         f"pack it for this seed (python -m epic_sglang.data.pack DIR --n {n} --seed {seed})")
    order = sorted(questions, key=lambda ex: hashlib.sha256(f"{seed}:{ex.id}".encode()).digest())
    return [EvalExample(ex.id, ex.question, ex.paragraphs, ex.answer) for ex in order[:n]]


def task_examples(task: str, n: int, seed: int, tokenizer=None, lengths: list[int] | None = None) -> list[EvalExample]:
    """n examples of the task: HotpotQA questions, or needle cells (every length x 10 depths,
    repeated with new haystacks, keys and values until n)."""
    if task == "hotpotqa":
        return sample_questions(n, seed)
    if task != "needle":
        raise ValueError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    lengths = lengths or NEEDLE_LENGTHS
    repeats = -(-n // (10 * len(lengths)))
    return [EvalExample(ex.id, ex.question, ex.documents, ex.answer)
            for ex in needle_examples(tokenizer, lengths, 10, repeats, seed)[:n]]


def exact_fraction(stats) -> float:
    """Share of the prompt whose KV is exact: recomputed in context, or an exact prefix hit
    (the system prompt is cached after the first question; it counts as the policy's)."""
    return (stats.recomputed_tokens + stats.cached_prefix_tokens) / stats.prompt_tokens


def evaluate_batch(engine: Engine, examples: list[EvalExample], task: Task, policies: list[str],
                   max_new_tokens: int) -> list[EvalRow]:
    """All policies of the examples in one batch; `fr` always runs as the fidelity reference."""
    wanted = [parse_policy(p).name for p in policies]
    names = ["fr"] + [p for p in wanted if p != "fr"]
    reqs = [Request(ex.question, list(ex.documents), task.system, p, SamplingParams(max_new_tokens=max_new_tokens),
                    return_first_logits=True) for ex in examples for p in names]
    results = engine.generate_batch(reqs)
    rows = []
    for i, ex in enumerate(examples):
        mine = results[i * len(names):(i + 1) * len(names)]
        ref = mine[0]
        ref_logp = torch.log_softmax(ref.first_logits, -1)
        for name, r in zip(names, mine):
            if name not in wanted:
                continue
            logp = torch.log_softmax(r.first_logits, -1)
            f1, em = task.score(r.text, ex.answer)
            rows.append(EvalRow(ex.id, name, ex.answer, r.text.strip(), f1, em,
                                float(r.output_ids[:1] == ref.output_ids[:1]),
                                token_agreement(r.output_ids, ref.output_ids),
                                float((ref_logp.exp() * (ref_logp - logp)).sum()),
                                exact_fraction(r.stats), r.stats.prompt_tokens))
    return rows


def load_rows(path: Path) -> list[EvalRow]:
    """Every row an evaluation file holds (none if it does not exist)."""
    return [EvalRow(**json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def run_eval(engine: Engine, examples: list[EvalExample], policies: list[str], out: Path,
             task: Task = TASKS["hotpotqa"], max_new_tokens: int | None = None, progress: bool = True,
             batch_requests: int | None = None) -> list[EvalRow]:
    """Evaluate the examples, resuming from `out` (JSON lines). A batch holds as many
    examples as fit `batch_requests` requests (default: the engine's request rows)."""
    wanted = [parse_policy(p).name for p in policies]
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out)
    done = {(r.qid, r.policy) for r in rows}
    per_batch = max(1, (batch_requests or len(engine.req_to_token_pool.req_to_token)) // (len(set(wanted) | {"fr"})))
    from tqdm import tqdm

    todo = [(ex, tuple(p for p in wanted if (ex.id, p) not in done)) for ex in examples]
    todo = [(ex, t) for ex, t in todo if t]
    with open(out, "a") as f, tqdm(total=len(todo), desc=f"eval {task.name}", unit="question", disable=not progress) as bar:
        i = 0
        while i < len(todo):
            same = [ex for ex, t in todo[i:i + per_batch] if t == todo[i][1]]  # one policy list per batch
            for row in evaluate_batch(engine, same, task, list(todo[i][1]), max_new_tokens or task.max_new_tokens):
                f.write(json.dumps(asdict(row)) + "\n")
                rows.append(row)
            f.flush()
            i += len(same)
            bar.update(len(same))
    ids = {ex.id for ex in examples}
    return [r for r in rows if r.qid in ids and r.policy in wanted]


def summarize(rows: list[EvalRow]) -> dict[str, dict[str, float]]:
    by = defaultdict(list)
    for r in rows:
        by[r.policy].append(r)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {p: {"n": len(rs), "f1": 100 * mean([r.f1 for r in rs]), "em": 100 * mean([r.em for r in rs]),
                "first_token_agree": 100 * mean([r.first_token_agree for r in rs]),
                "token_agree": 100 * mean([r.token_agree for r in rs]), "kl_first": mean([r.kl_first for r in rs]),
                "recompute_pct": 100 * mean([r.recompute_fraction for r in rs])}
            for p, rs in by.items()}


def f1_difference(rows: list[EvalRow], a: str, b: str, resamples: int = 5000,
                  seed: int = 0) -> tuple[int, float, float, float] | None:
    """F1(a) - F1(b) on the questions both answered, in points, with a 95% paired bootstrap
    interval: (questions, difference, low, high); None when they share no question."""
    f1 = defaultdict(dict)
    for r in rows:
        f1[r.policy][r.qid] = r.f1
    shared = sorted(set(f1[a]) & set(f1[b]))
    if not shared:
        return None
    return (len(shared), *paired_interval([100 * (f1[a][q] - f1[b][q]) for q in shared], resamples, seed))


def paired_interval(diffs: list[float], resamples: int = 5000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of per-question differences and its 95% bootstrap interval: (mean, low, high)."""
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    return sum(diffs) / len(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


GATE_MARGIN = 2.0  # F1 points a linked policy may lose against fr and still pass the gate


@dataclass(frozen=True)
class Verdict:
    policy: str
    questions: int
    difference: float  # policy - fr, F1 points
    low: float
    high: float
    verdict: str  # pass | fail | inconclusive

    def line(self, margin: float) -> str:
        why = {"pass": f"at most {margin:g} points below fr (95% interval above -{margin:g})",
               "fail": f"more than {margin:g} points below fr (95% interval below -{margin:g})",
               "inconclusive": f"interval straddles -{margin:g}: run more questions (--n)"}[self.verdict]
        return (f"{self.policy}: F1 {self.difference:+.1f} vs fr [{self.low:+.1f}, {self.high:+.1f}], "
                f"n={self.questions}: {self.verdict.upper()}, {why}")


def fidelity_gate(rows: list[EvalRow], margin: float = GATE_MARGIN) -> list[Verdict]:
    """Per linked policy, its paired F1 difference to fr and a non-inferiority verdict with
    `margin`: pass when the whole 95% interval lies above -margin, fail when it lies below."""
    out = []
    for policy in sorted({r.policy for r in rows} - {"fr"}):
        d = f1_difference(rows, policy, "fr")
        if d is None:
            continue
        n, diff, low, high = d
        out.append(Verdict(policy, n, diff, low, high,
                           "pass" if low > -margin else "fail" if high < -margin else "inconclusive"))
    return out


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| policy | n | F1 | EM | first-token agree % | greedy token agree % | KL(fr \\|\\| policy) first token | recomputed % |",
             "|---|---|---|---|---|---|---|---|"]
    for p, s in sorted(summary.items(), key=lambda kv: -kv[1]["recompute_pct"]):
        lines.append(f"| {p} | {s['n']} | {s['f1']:.1f} | {s['em']:.1f} | {s['first_token_agree']:.1f} | "
                     f"{s['token_agree']:.1f} | {s['kl_first']:.4f} | {s['recompute_pct']:.1f} |")
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for p, s in summary.items():
        ax.scatter(s["recompute_pct"], s["f1"])
        ax.annotate(p, (s["recompute_pct"], s["f1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("tokens recomputed at link time (% of prompt, log)")
    ax.set_ylabel("answer F1")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
