"""HotpotQA accuracy of link policies -> BENCHMARKS.md table + PNG plot.

    python benchmarks/accuracy.py --model qwen2.5-0.5b --n 300 --policies fr,naive,legolink-16,cacheblend-15
    python benchmarks/accuracy.py --model qwen2.5-0.5b --n 50 --policies legolink0,legolink-1,...  # same file, resumed

Results accumulate in runs/eval-<model>-seed<seed>.jsonl (resumable); the report covers
every policy found there for the first n seeded questions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang import Engine  # noqa: E402
from epic_sglang.evaluation import DEFAULT_POLICIES, SYSTEM, markdown_table, plot, run_eval, summarize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    engine = Engine(args.model, device="cpu")
    out = Path(f"runs/eval-{args.model}-seed{args.seed}.jsonl")
    rows = run_eval(engine, args.n, args.policies.split(","), out, seed=args.seed)
    summary = summarize(rows)
    png = Path(__file__).resolve().parent / f"accuracy-{args.model}.png"
    plot(summary, png, f"HotpotQA dev (distractor), {args.model}, seed {args.seed}")
    body = f"""## Accuracy: HotpotQA dev (distractor), {args.model}, greedy, 32 new tokens

Machine: {machine()}. Questions: seeded sample (seed {args.seed}) of the 7,405; n per policy below.
Each paragraph is one document compiled alone; prompt = system + 10 documents + question.
System prompt: "{SYSTEM}"

{markdown_table(summary)}

![F1 against recomputed share]({png.name})
"""
    write_section(f"accuracy-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
