"""Accuracy of link policies (HotpotQA or the needle test) -> BENCHMARKS.md table + PNG plot.

    python benchmarks/accuracy.py --model qwen2.5-0.5b --n 300 --policies fr,naive,legolink-16,querylink-16
    python benchmarks/accuracy.py --model qwen2.5-0.5b --device cuda --n 1500   # on the GPU host (gpu_run.sh accuracy)
    python benchmarks/accuracy.py --task needle --n 200 --policies fr,naive,legolink-16,querylink-16
    python benchmarks/accuracy.py --task needle --lengths 8192 --n 20 ...  # some haystack lengths only (CPU)
    python benchmarks/accuracy.py ... --report-n 300  # same file, resumed; the report covers every policy in it
    python benchmarks/accuracy.py ... --report-only   # the report from the results file alone (no model):
                                                      # for a run made on a host without matplotlib

Results accumulate in runs/eval-<task>-<model>-seed<seed>.jsonl (resumable); the report covers
the policies asked for over the first n seeded examples, or with --report-n every policy the
file holds over the first N (each policy's own n is in the table). `--tag` names the
BENCHMARKS.md section, so a design sweep does not replace the main table. The machine and
command of the run that measured the results are kept beside them (`<results>.meta.json`).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang import Engine  # noqa: E402
from epic_sglang.evaluation import (  # noqa: E402
    DEFAULT_POLICIES, TASKS, f1_difference, load_rows, markdown_table, plot, run_eval, summarize, task_examples)

PAIRS = [("querylink-16", "legolink-16"), ("legolink-16", "naive"), ("legolink-16", "cacheblend-15")]


def differences(rows) -> str:
    """Every policy against fr, then the named pairs present: paired differences with 95%
    bootstrap intervals."""
    policies = sorted({r.policy for r in rows} - {"fr"})
    pairs = [(p, "fr") for p in policies] + [(a, b) for a, b in PAIRS if a in policies and b in policies]
    lines = ["| score difference | questions | points | 95% interval (paired bootstrap) |", "|---|---|---|---|"]
    for a, b in pairs:
        d = f1_difference(rows, a, b)
        if d is not None:
            lines.append(f"| {a} - {b} | {d[0]} | {d[1]:+.1f} | [{d[2]:+.1f}, {d[3]:+.1f}] |")
    return "\n".join(lines)


def needle_grid(rows) -> str:
    """Needle: recovered % per policy and haystack length (over the 10 depths and repeats);
    the length is in each example's id (`needle-<length>-<depth>-<repeat>`)."""
    hits: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        hits[r.policy][int(r.qid.split("-")[1])].append(r.f1)
    lengths = sorted({n for by in hits.values() for n in by})
    lines = ["| policy | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for p in sorted(hits):
        lines.append(f"| {p} | " + " | ".join(
            f"{100 * sum(hits[p][n]) / len(hits[p][n]):.1f}" if hits[p][n] else "-" for n in lengths) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--task", choices=sorted(TASKS), default="hotpotqa")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="needle: haystack lengths in tokens (default: every length of the test); a cell's id "
                         "names its length, so runs over some lengths share the results file")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--max-requests", type=int, default=64, help="requests per batch (several questions at once)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's; 1 = first-token fidelity only")
    ap.add_argument("--tag", default=None, help="BENCHMARKS.md section suffix (default: the model)")
    ap.add_argument("--report-n", type=int, default=None,
                    help="report every policy in the results file over the first N seeded examples (default: --n)")
    ap.add_argument("--report-only", action="store_true",
                    help="no model: report the results file's rows of --policies (or 'all')")
    args = ap.parse_args()
    if args.lengths and args.task != "needle":
        sys.exit("--lengths: only with --task needle (HotpotQA's prompts are as long as their paragraphs)")
    if args.lengths and min(args.lengths) < 512:
        sys.exit(f"--lengths: each haystack needs at least one 512-token document, got {min(args.lengths)}")

    task = TASKS[args.task]
    tokens = "" if args.max_new_tokens is None else f"-t{args.max_new_tokens}"
    out = Path(f"runs/eval-{args.task}-{args.model}-seed{args.seed}{tokens}.jsonl")
    meta_path = out.with_suffix(".meta.json")
    if args.report_only:
        rows = [r for r in load_rows(out) if args.policies == "all" or r.policy in args.policies.split(",")]
    else:
        engine = Engine(args.model, device=args.device, kv_cache_gb=args.kv_cache_gb, max_requests=args.max_requests)
        try:
            examples = task_examples(args.task, max(args.n, args.report_n or 0), args.seed, engine.tokenizer, args.lengths)
        except ValueError as err:  # e.g. fewer questions in a packed data file than asked for
            sys.exit(str(err))
        rows = run_eval(engine, examples[:args.n], args.policies.split(","), out, task, args.max_new_tokens)
        meta_path.write_text(json.dumps({"machine": machine(), "command": "python " + " ".join(sys.argv)}))
        if args.report_n is not None:
            ids = {ex.id for ex in examples[:args.report_n]}
            rows = [r for r in load_rows(out) if r.qid in ids]
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"machine": machine(), "command": None}
    summary = summarize(rows)
    shared_table = ""
    if len({v["n"] for v in summary.values()}) > 1:  # policies with different n: also compare on common ground
        by_policy: dict[str, set] = {}
        for r in rows:
            by_policy.setdefault(r.policy, set()).add(r.qid)
        common = set.intersection(*by_policy.values())
        shared_table = (f"The same {len(common)} examples for every policy:\n\n"
                        + markdown_table(summarize([r for r in rows if r.qid in common])) + "\n")
    tag = args.tag or args.model
    png = Path(__file__).resolve().parent / f"accuracy-{args.task}-{tag}.png"
    what = {"hotpotqa": "HotpotQA dev (distractor)", "needle": "needle in Paul Graham essays"}[args.task]
    try:
        plot(summary, png, f"{what}, {args.model}, seed {args.seed}")
    except ImportError:  # a GPU host without matplotlib: the report is redone here with --report-only
        print(f"no matplotlib: no plot; make the report with: python benchmarks/accuracy.py --report-only "
              f"--task {args.task} --model {args.model} --seed {args.seed} --policies all")
    if args.task == "hotpotqa":
        setup = (f"Questions: seeded sample (seed {args.seed}) of the 7,405; n per policy below. Each paragraph is "
                 f"one document compiled alone; prompt = system + 10 documents + question; F1 / EM on the answer.")
    else:
        setup = (f"Haystacks of Paul Graham essays cut into 512-token documents; one needle sentence "
                 f"(\"One of the special magic numbers for KEY is: VALUE.\") at 10 depths per length; F1 = EM = "
                 f"the value recovered (%). Seed {args.seed}. Recovered % by haystack length:\n\n"
                 f"{needle_grid(rows)}\n")
    body = f"""## Accuracy: {what}, {args.model}, greedy, {args.max_new_tokens or task.max_new_tokens} new tokens{'' if tag == args.model else f' ({tag})'}

Machine: {meta["machine"]}. {setup}
System prompt: "{task.system}"

{markdown_table(summary)}

{shared_table}
{differences(rows)}

![score against recomputed share]({png.name})
{f"{chr(10)}Measured by: `{meta['command']}`" if meta["command"] and args.report_only else ""}
"""
    write_section(f"accuracy-{args.task}-{tag}", body)
    print(body)


if __name__ == "__main__":
    main()
