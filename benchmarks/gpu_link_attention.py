"""GPU: a legolink-16 link's attention alone, per link mode and cascade bulk chunk size.

    python benchmarks/gpu_link_attention.py [--contexts 16384 32768] [--groups 128] [--chunks 0 4096 2048 1024]

The engine's FlashInfer backend on Llama-3-8B's attention shape (32 query heads, 8 KV heads,
head dim 128): the queries of a legolink-16 request (a 32-token head, the first 16 tokens
of each 512-token document, a 64-token question) over a context of random keys. Times the
attention of 32 layers (one plan, 32 forwards of one layer's pool: the key gather and
rotation included), median of `--repeats`, with CUDA events; the cascade for each group size
(queries per bulk entry) and bulk chunk (keys per bulk entry; 0 = unsplit).
Writes its table to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_ttft import LLAMA_8B  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang.attention import flashinfer_backend  # noqa: E402
from epic_sglang.link_plan import CascadeTuning  # noqa: E402
from epic_sglang.forward_batch import ForwardBatch  # noqa: E402
from epic_sglang.kv_pool import KVPool  # noqa: E402
from epic_sglang.models.config import ModelConfig  # noqa: E402

LAYERS = 32


def link_positions(context: int, head: int = 32, doc: int = 512, question: int = 64, k: int = 16) -> list[int]:
    docs = (context - head - question) // doc
    end = head + docs * doc
    return [*range(head), *(head + i * doc + j for i in range(docs) for j in range(k)), *range(end, end + question)]


def time_link(attention, pool: KVPool, batch: ForwardBatch, q: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(plan ms, attention ms over LAYERS forwards), medians."""
    plans, runs = [], []
    for _ in range(repeats + 2):  # two warm-ups
        torch.cuda.synchronize()
        start, planned, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        attention.plan(batch)
        planned.record()
        for _ in range(LAYERS):
            attention.forward(q, 0, pool, batch)
        end.record()
        torch.cuda.synchronize()
        plans.append(start.elapsed_time(planned))
        runs.append(planned.elapsed_time(end))
    return statistics.median(plans[2:]), statistics.median(runs[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--groups", type=int, nargs="+", default=[CascadeTuning().group])
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 2048, 1024])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    cfg = ModelConfig.from_hf_dict(LLAMA_8B)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    default = (CascadeTuning().group, CascadeTuning().chunk)
    rows = []
    for context in args.contexts:
        positions = link_positions(context)
        n = positions[-1] + 1
        pool = KVPool(n, 1, cfg.num_kv_heads, cfg.head_dim, bf16, dev)
        for t in (pool.k_buffer[0], pool.v_buffer[0]):
            t.normal_()
        pos = torch.tensor(positions, device=dev)
        batch = ForwardBatch.build([(pos, pos, pos + 1, torch.arange(1, n + 1, device=dev))])
        q = torch.randn(len(positions), cfg.num_heads, cfg.head_dim, device=dev, dtype=bf16)
        variants = [("cascade", g, c) for g in args.groups for c in args.chunks] + [("gathered", 0, 0), ("fused", 0, 0)]
        for mode, group, chunk in variants:
            tuning = CascadeTuning(group=group or default[0], chunk=chunk or 1 << 30)
            attention = flashinfer_backend.FlashInferAttention(cfg, dev, bf16, mode, tuning)
            plan_ms, run_ms = time_link(attention, pool, batch, q, args.repeats)
            label = mode if mode != "cascade" else f"cascade, group {group}, " + (f"chunk {chunk:,}" if chunk else "unsplit")
            rows.append(f"| {n:,} | {len(positions)} | {label}{' (default)' if (group, chunk) == default else ''} "
                        f"| {plan_ms:.2f} | {run_ms:.2f} |")
            print(rows[-1], flush=True)
    write_section("gpu_link_attention", f"""## GPU: a legolink-16 link's attention alone (Llama-3-8B attention shape)

Card: {machine()}. The engine's FlashInfer backend; the queries of a legolink-16 request
(32-token head, the first 16 tokens of each 512-token document, 64-token question) over random
bf16 keys. `attention ms` = {LAYERS} layers' attention (key gather + rotation + kernels + merge), one
plan; medians of {args.repeats} after two warm-ups. `cascade, group g, chunk c`: runs grouped to g queries
per bulk entry, bulk keys in entries of at most c keys.

| context | queries | mode | plan ms | attention ms ({LAYERS} layers) |
|---|---|---|---|---|
{chr(10).join(rows)}
""")


if __name__ == "__main__":
    main()
