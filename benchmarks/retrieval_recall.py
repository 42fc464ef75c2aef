"""Ingest 10,000 HotpotQA paragraphs and measure recall@k of the gold paragraphs.

    python benchmarks/retrieval_recall.py [--paragraphs 10000] [--questions 200] [--k 10]

Every paragraph of the first questions' distractor sets goes in (each one document);
questions are drawn (seeded) from those whose paragraphs are all ingested.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang.data.hotpotqa import load_hotpotqa  # noqa: E402
from retrieval.embedder import Embedder  # noqa: E402
from retrieval.ingest import ingest, load_tokenizer  # noqa: E402
from retrieval.retriever import Retriever, recall_at_k  # noqa: E402
from retrieval.store import DocumentStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paragraphs", type=int, default=10_000)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--model", default="qwen2.5-0.5b", help="tokenizer that measures chunks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    examples, seen = [], set()
    for ex in load_hotpotqa():
        if len(seen) >= args.paragraphs:
            break
        examples.append(ex)
        seen.update(ex.paragraphs)
    work = Path(tempfile.mkdtemp(prefix="epic-recall-"))
    with open(work / "hotpot.jsonl", "w") as f:
        for ex in examples:
            for title, text in zip(ex.titles, ex.paragraphs):
                f.write(json.dumps({"title": title, "text": text}) + "\n")

    embedder = Embedder()
    store = DocumentStore(work / "store")
    report = ingest([str(work / "hotpot.jsonl")], store, load_tokenizer(args.model), embedder)
    questions = random.Random(args.seed).sample(examples, min(args.questions, len(examples)))
    retriever = Retriever(store, embedder)
    t = time.perf_counter()
    hits = [[h.document.title for h in retriever.search(ex.question, top_k=args.k)] for ex in questions]
    query_ms = (time.perf_counter() - t) / len(questions) * 1000
    recall = recall_at_k(hits, [set(ex.supporting_titles) for ex in questions])
    body = f"""## Retrieval: HotpotQA recall@{args.k} over {store.count():,} ingested paragraphs

Machine: {machine()}. Embedder all-MiniLM-L6-v2 (offline package), FAISS {type(store.index().index).__name__}
(exact inner product), chunks measured in {args.model} tokens (512 max).

| paragraphs in | chunks stored | ingest s | chunks/s | questions | recall@{args.k} (gold titles) | query ms |
|---|---|---|---|---|---|---|
| {len(seen):,} | {store.count():,} | {report.seconds:.0f} | {report.chunks / report.seconds:.1f} | {len(questions)} (seed {args.seed}) | **{recall:.3f}** | {query_ms:.1f} |

Target: recall@10 >= 0.85.
"""
    write_section("retrieval_recall", body)
    print(body)


if __name__ == "__main__":
    main()
