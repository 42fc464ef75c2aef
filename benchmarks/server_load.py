"""The HTTP server end to end: TTFT seen by a client, and a RAG load, fr against legolink-16.

    python benchmarks/server_load.py [--model smollm2-135m] [--requests 64] [--concurrency 8]

Runs the real server (uvicorn on loopback, continuous batching) over one engine. HotpotQA
paragraphs are the documents, sent in the chat `documents` field; every request has its
own system prompt, so a prefix cache alone would miss (the PIC case).
1. TTFT: sequential streaming requests (10 documents each, precompiled), time from sending
   to the first content chunk, per policy.
2. Load: a closed loop of `concurrency` clients (each sends its next request when one ends), requests of 6 documents drawn
   with Zipf popularity from a pool of 60, 16 output tokens, streaming; requests/s, TTFT
   p50/p90, errors.
Writes a section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang.data.hotpotqa import load_hotpotqa  # noqa: E402
from epic_sglang.server import ServerConfig, create_app  # noqa: E402
from epic_sglang.server.background import serve_in_thread  # noqa: E402

POLICIES = ("fr", "legolink-16")


def stream_chat(url: str, question: str, docs: list[str], policy: str, system: str, max_tokens: int) -> tuple[float, str]:
    """(client TTFT in seconds, error or '') of one streaming chat request."""
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "documents": docs, "policy": policy, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        if r.status_code != 200:
            return 0.0, f"{r.status_code} {r.text[:200]}"
        for line in r.iter_lines():
            if ttft is None and line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
            if line == b"data: [DONE]":
                return (ttft if ttft is not None else time.perf_counter() - t0), ""
    return 0.0, "stream ended without [DONE]"


def ttft_rows(url: str, examples, repeats: int) -> list[str]:
    rows = []
    for ex in examples[:repeats]:  # warm-up: compile every measured document once
        stream_chat(url, ex.question, list(ex.paragraphs), "legolink-16", "warm-up", 1)
    for policy in POLICIES:
        times = [stream_chat(url, ex.question, list(ex.paragraphs), policy, f"System prompt {i} for {policy}.", 1)[0]
                 for i, ex in enumerate(examples[:repeats])]
        rows.append((policy, statistics.median(times)))
    return [f"| {p} | {t * 1000:,.0f} |" for p, t in rows] + \
        [f"| fr / legolink-16 | {rows[0][1] / rows[1][1]:.1f}x |"]


def load_row(url: str, examples, policy: str, n: int, concurrency: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    pool = [p for ex in examples for p in ex.paragraphs][:60]
    weights = [1 / (i + 1) for i in range(len(pool))]  # Zipf popularity
    jobs = [(examples[i % len(examples)].question, rng.choices(pool, weights, k=6)) for i in range(n)]
    for q, docs in jobs[:2]:
        stream_chat(url, q, docs, policy, "warm-up", 1)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(lambda j: stream_chat(url, j[1][0], j[1][1], policy, f"client {j[0]}", 16), enumerate(jobs)))
    wall = time.perf_counter() - t0
    ttfts = sorted(t for t, err in results if not err)
    errors = sum(1 for _, err in results if err)
    p90 = ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else float("nan")
    return (f"| {policy} | {n} | {concurrency} | {n / wall:.2f} | {statistics.median(ttfts) * 1000:,.0f} | "
            f"{p90 * 1000:,.0f} | {errors} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    examples = load_hotpotqa()[:40]
    config = ServerConfig(model=args.model, device=args.device, kv_dir=None, max_running=args.concurrency)
    with serve_in_thread(create_app(config)) as url:
        ttft = ttft_rows(url, examples, args.repeats)
        print("\n".join(ttft), flush=True)
        load = [load_row(url, examples, p, args.requests, args.concurrency) for p in POLICIES]
        print("\n".join(load), flush=True)
    body = f"""## Server over HTTP ({args.model}, {machine()})

`python benchmarks/server_load.py --model {args.model} --requests {args.requests} --concurrency {args.concurrency}`:
the real server (uvicorn, continuous batching) on loopback; HotpotQA paragraphs sent as chat
`documents`, a different system prompt on every request (a prefix cache alone would miss).

Client TTFT (send to first content chunk, streaming), 10 documents per request, documents
already compiled, median of {args.repeats}:

| policy | TTFT ms |
|---|---|
{chr(10).join(ttft)}

RAG load: closed loop, {args.concurrency} clients, 6 documents per request drawn with Zipf popularity from 60,
16 output tokens, streaming:

| policy | requests | clients | requests/s | TTFT p50 ms | TTFT p90 ms | errors |
|---|---|---|---|---|---|---|
{chr(10).join(load)}
"""
    write_section(f"server-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
