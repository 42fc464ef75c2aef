"""Accuracy of every link policy on HotpotQA (distractor setting), through one engine.

Each of a question's 10 paragraphs is one document, compiled alone; prompt = system + 10
documents + question; greedy decoding. Per policy: answer F1 / exact match (the standard
HotpotQA normalization) and fidelity to `fr`: first-token agreement, 32-token greedy
agreement, and the KL divergence of the first token's distribution from fr's.

Results are appended to a JSON-lines file as they come, so an interrupted run resumes.
"""
from __future__ import annotations

import json
import random
import re
import string
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from epic_sglang.data.hotpotqa import HotpotExample, load_hotpotqa
from epic_sglang.engine import Engine, Request
from epic_sglang.policies import parse_policy
from epic_sglang.sampling import SamplingParams

SYSTEM = ("Answer the question using the documents. Reply with the answer only (a few words, "
          "or yes / no), with no explanation.")
DEFAULT_POLICIES = ["fr", "naive", "legolink0", "legolink-1", "legolink-2", "legolink-4", "legolink-8",
                    "legolink-16", "legolink-32", "cacheblend-5", "cacheblend-15"]


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


def sample_questions(n: int, seed: int) -> list[HotpotExample]:
    """The first n of one seeded shuffle, so a larger n extends a smaller run instead of redrawing it."""
    data = list(load_hotpotqa())
    random.Random(seed).shuffle(data)
    return data[:n]


def exact_fraction(stats) -> float:
    """Share of the prompt whose KV is exact: recomputed in context, or an exact prefix hit
    (the system prompt is cached after the first question; it counts as the policy's)."""
    return (stats.recomputed_tokens + stats.cached_prefix_tokens) / stats.prompt_tokens


def evaluate_question(engine: Engine, ex: HotpotExample, policies: list[str], max_new_tokens: int) -> list[EvalRow]:
    """All policies of one question in one batch; `fr` always runs as the fidelity reference."""
    names = ["fr"] + [p for p in policies if parse_policy(p).name != "fr"]
    reqs = [Request(ex.question, list(ex.paragraphs), SYSTEM, p, SamplingParams(max_new_tokens=max_new_tokens),
                    return_first_logits=True) for p in names]
    results = engine.generate_batch(reqs)
    ref = results[0]
    ref_logp = torch.log_softmax(ref.first_logits, -1)
    rows = []
    for name, r in zip(names, results):
        if name == "fr" and "fr" not in [parse_policy(p).name for p in policies]:
            continue
        logp = torch.log_softmax(r.first_logits, -1)
        f1, em = f1_exact(r.text, ex.answer)
        rows.append(EvalRow(ex.id, parse_policy(name).name, ex.answer, r.text.strip(), f1, em,
                            float(r.output_ids[:1] == ref.output_ids[:1]), token_agreement(r.output_ids, ref.output_ids),
                            float((ref_logp.exp() * (ref_logp - logp)).sum()),
                            exact_fraction(r.stats), r.stats.prompt_tokens))
    return rows


def load_rows(path: Path) -> list[EvalRow]:
    """Every row an evaluation file holds (none if it does not exist)."""
    return [EvalRow(**json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def run_eval(engine: Engine, n: int, policies: list[str], out: Path, seed: int = 0, max_new_tokens: int = 32,
             progress: bool = True) -> list[EvalRow]:
    """Evaluate n seeded questions, resuming from `out` (JSON lines)."""
    for p in policies:
        parse_policy(p)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out)
    done = {(r.qid, r.policy) for r in rows}
    wanted = [parse_policy(p).name for p in policies]
    questions = sample_questions(n, seed)
    from tqdm import tqdm

    with open(out, "a") as f:
        for ex in tqdm(questions, desc="eval", unit="question", disable=not progress):
            todo = [p for p in wanted if (ex.id, p) not in done]
            if not todo:
                continue
            for row in evaluate_question(engine, ex, todo, max_new_tokens):
                f.write(json.dumps(asdict(row)) + "\n")
                f.flush()
                rows.append(row)
    ids = {ex.id for ex in questions}
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
    diffs = [100 * (f1[a][q] - f1[b][q]) for q in shared]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(resamples))
    return len(shared), sum(diffs) / len(diffs), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def markdown_table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| policy | n | F1 | EM | first-token agree % | 32-token agree % | KL(fr \\|\\| policy) first token | recomputed % |",
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
