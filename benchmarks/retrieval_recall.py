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
    ap.add_argument("--store", default=None, help="reuse a store folder (already embedded chunks are skipped)")
    args = ap.parse_args()

    examples, seen = [], set()
    for ex in load_hotpotqa():
        if len(seen) >= args.paragraphs:
            break
        examples.append(ex)
        seen.update(ex.paragraphs)
    work = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="epic-recall-"))
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "hotpot.jsonl", "w") as f:
        for ex in examples:
            for title, text in zip(ex.titles, ex.paragraphs):
                f.write(json.dumps({"title": title, "text": text}) + "\n")

    embedder = Embedder()
    store = DocumentStore(work / "store")
    report = ingest([str(work / "hotpot.jsonl")], store, load_tokenizer(args.model), embedder)
    questions = random.Random(args.seed).sample(examples, min(args.questions, len(examples)))
    gold = [set(ex.supporting_titles) for ex in questions]
    rows = []
    for mode in ("hybrid", "dense"):
        retriever = Retriever(store, embedder, mode)
        t = time.perf_counter()
        hits = [[h.document.title for h in retriever.search(ex.question, top_k=args.k)] for ex in questions]
        query_ms = (time.perf_counter() - t) / len(questions) * 1000
        rows.append(f"| {mode} | {len(seen):,} | {store.count():,} | {len(questions)} (seed {args.seed}) | "
                    f"**{recall_at_k(hits, gold):.3f}** | {query_ms:.1f} |")
    body = f"""## Retrieval: HotpotQA recall@{args.k} over {store.count():,} ingested paragraphs

Machine: {machine()}. Embedder all-MiniLM-L6-v2 (offline package), FAISS exact inner
product; hybrid = FAISS fused with SQLite FTS5 BM25 by reciprocal rank. Chunks measured in
{args.model} tokens (512 max). Ingest of this run: {report.chunks:,} chunks in {report.seconds:.0f} s
({report.chunks / report.seconds:.1f} chunks/s; chunks already stored are not embedded again).

| retrieval | paragraphs in | chunks stored | questions | recall@{args.k} (gold titles) | query ms |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Target: recall@10 >= 0.85.
"""
    write_section("retrieval_recall", body)
    print(body)


if __name__ == "__main__":
    main()
