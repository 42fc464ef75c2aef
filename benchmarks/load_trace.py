"""The RAG load's request trace (`sglang_pic.py --part load`): one JSON line per request, and
the per-run table read from it.

A request's line: its run, when it was sent (s from the run's start), how long it waited for
documents compiled on the clock, its TTFT and the time to its last token (s from when it was
sent), and SGLang's prompt and cached token counts.
"""
from __future__ import annotations

import json
from pathlib import Path

COMPILE_WAIT_S = 0.005  # a request that waited longer than this had a document compiled on the clock
OUTPUT_TOKENS = 32  # a load request's greedy tokens (`ignore_eos`: all of them, streamed one by one)


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile of `xs` as every load table reads it: the sorted value at int(q x (n - 1))."""
    return sorted(xs)[int(q * (len(xs) - 1))]


def write_trace(path: Path, traces: list[list[dict]]) -> None:
    """Every request so far, one JSON line each (rewritten after each run: a run cut short keeps the rest)."""
    path.write_text("".join(json.dumps(t) + "\n" for trace in traces for t in trace))


def read_runs(path: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        t = json.loads(line)
        runs.setdefault(t["run"], []).append(t)
    return runs


def steady_rate(requests: list[dict]) -> float:
    """Requests completed per second in the second half of the arrival window (from half the
    last arrival's time to it): the server's pace while the load lasts, without the ramp-up and
    without the drain after the last arrival, which the run's own rate (requests / time to the
    last token) counts. A server that keeps up completes about the offered rate here; one whose
    decode steps wait behind prefills completes few until the arrivals stop."""
    end = max(t["sent"] for t in requests)
    if end <= 0:
        return 0.0
    done = [t["sent"] + t["done"] for t in requests]
    return sum(end / 2 < d <= end for d in done) / (end / 2)


def trace_rows(path: Path) -> list[str]:
    """Per run of a load trace: TTFT split by whether the request waited for a document compiled
    on the clock (not held, or evicted), the first-token latency past that wait, the time per
    output token after the first (decode steps that wait behind prefill batches show here), and
    the steady completion rate."""
    def p(xs: list[float], q: float) -> str:
        return f"{percentile(xs, q) * 1000:,.0f}" if xs else "-"

    rows = []
    for run, ts in read_runs(path).items():
        held = [t["ttft"] for t in ts if t["compiled"] <= COMPILE_WAIT_S]
        waited = [t for t in ts if t["compiled"] > COMPILE_WAIT_S]
        tpot = [(t["done"] - t["ttft"]) / (OUTPUT_TOKENS - 1) for t in ts]
        rows.append(f"| {run} | {len(ts)} | {p([t['ttft'] for t in ts], .5)} / {p([t['ttft'] for t in ts], .9)} | "
                    f"{len(held)} | {p(held, .5)} / {p(held, .9)} | {len(waited)} | "
                    f"{p([t['compiled'] for t in waited], .5)} | {p([t['ttft'] - t['compiled'] for t in waited], .5)} | "
                    f"{p(tpot, .5)} / {p(tpot, .9)} | {steady_rate(ts):.1f} |")
    return rows


TRACE_HEADER = ("| run | requests | TTFT p50 / p90 ms | all documents held | their TTFT p50 / p90 ms "
                "| waited for a compile | compile wait p50 ms | TTFT past the wait p50 ms | time per output token p50 / p90 ms "
                "| completed / s, 2nd half of the arrivals |"
                "\n|---|---|---|---|---|---|---|---|---|---|")
