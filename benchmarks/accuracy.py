"""HotpotQA accuracy of link policies -> BENCHMARKS.md table + PNG plot.

    python benchmarks/accuracy.py --model qwen2.5-0.5b --n 300 --policies fr,naive,legolink-16,cacheblend-15
    python benchmarks/accuracy.py --model qwen2.5-0.5b --n 50 --policies legolink0,legolink-1,... \
        --report-n 300  # same file, resumed; the report covers every policy in it

Results accumulate in runs/eval-<model>-seed<seed>.jsonl (resumable); the report covers the
policies asked for over the first n seeded questions, or with --report-n every policy the
file holds over the first N (each policy's own n is in the table).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang import Engine  # noqa: E402
from epic_sglang.evaluation import (  # noqa: E402
    DEFAULT_POLICIES, SYSTEM, f1_difference, load_rows, markdown_table, plot, run_eval, sample_questions, summarize)

PAIRS = [("fr", "legolink-16"), ("legolink-16", "naive"), ("legolink-16", "cacheblend-15"), ("fr", "naive")]


def differences(rows) -> str:
    """Paired F1 differences with 95% bootstrap intervals, for the pairs both present."""
    lines = ["| F1 difference | questions | points | 95% interval (paired bootstrap) |", "|---|---|---|---|"]
    for a, b in PAIRS:
        d = f1_difference(rows, a, b)
        if d is not None:
            lines.append(f"| {a} - {b} | {d[0]} | {d[1]:+.1f} | [{d[2]:+.1f}, {d[3]:+.1f}] |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-n", type=int, default=None,
                    help="report every policy in the results file over the first N seeded questions (default: --n)")
    args = ap.parse_args()

    engine = Engine(args.model, device="cpu")
    out = Path(f"runs/eval-{args.model}-seed{args.seed}.jsonl")
    rows = run_eval(engine, args.n, args.policies.split(","), out, seed=args.seed)
    if args.report_n is not None:
        ids = {ex.id for ex in sample_questions(args.report_n, args.seed)}
        rows = [r for r in load_rows(out) if r.qid in ids]
    summary = summarize(rows)
    shared_table = ""
    if len({v["n"] for v in summary.values()}) > 1:  # policies with different n: also compare on common ground
        by_policy: dict[str, set] = {}
        for r in rows:
            by_policy.setdefault(r.policy, set()).add(r.qid)
        common = set.intersection(*by_policy.values())
        shared_table = (f"The same {len(common)} questions for every policy:\n\n"
                        + markdown_table(summarize([r for r in rows if r.qid in common])) + "\n")
    png = Path(__file__).resolve().parent / f"accuracy-{args.model}.png"
    plot(summary, png, f"HotpotQA dev (distractor), {args.model}, seed {args.seed}")
    body = f"""## Accuracy: HotpotQA dev (distractor), {args.model}, greedy, 32 new tokens

Machine: {machine()}. Questions: seeded sample (seed {args.seed}) of the 7,405; n per policy below.
Each paragraph is one document compiled alone; prompt = system + 10 documents + question.
System prompt: "{SYSTEM}"

{markdown_table(summary)}

{shared_table}
{differences(rows)}

![F1 against recomputed share]({png.name})
"""
    write_section(f"accuracy-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
