"""GPU: where a legolink-16 link's time goes (what separates it from pure kernel time).

    python benchmarks/gpu_profile.py --tokenizer DIR [--context 16384] [--policy legolink-16 | floor]

Same model and prompt as gpu_ttft.py (Llama-3-8B shape, random bf16 weights, 512-token
documents precompiled + 64-token question). Profiles `--repeats` first-token requests with
torch.profiler and reports wall time, summed GPU kernel time and the top CPU and GPU
operators; writes them to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_ttft import LLAMA_8B, first_token, floor_segments, model_dir, segments  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang import Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--policy", default="legolink-16", help="a link policy, or floor (as in gpu_ttft.py)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    engine = Engine(str(model_dir(LLAMA_8B, args.tokenizer)), device="cuda", load_format="dummy",
                    kv_cache_gb=16, max_context_len=args.context + 1024)
    num_docs = (args.context - 32 - 64) // 512
    segs = segments(num_docs, 512, 64, 32, LLAMA_8B["vocab_size"], seed=args.context)
    engine.compile_segments(segs, "legolink-16")
    policy = args.policy
    if policy == "floor":  # gpu_ttft's floor: legolink-16's new tokens, dense, over a cached context
        segs, policy = floor_segments(segs, new=32 + num_docs * 16 + 64), "naive"
        engine.compile_segments(segs, policy)
    for _ in range(3):
        first_token(engine, segs, policy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        ttfts = [first_token(engine, segs, policy)[1] for _ in range(args.repeats)]
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.repeats
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]  # aten ops would count their kernels again
    gpu_us = sum(e.self_device_time_total for e in kernels) / args.repeats
    by_gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:15]
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    launches = sum(e.count for e in kernels) / args.repeats
    rows_gpu = "\n".join(f"| {e.key[:70]} | {e.count // args.repeats} | {e.self_device_time_total / args.repeats / 1000:.2f} |"
                         for e in by_gpu)
    rows_cpu = "\n".join(f"| {e.key[:70]} | {e.count // args.repeats} | {e.self_cpu_time_total / args.repeats / 1000:.2f} |"
                         for e in by_cpu)
    body = f"""## GPU profile: {args.policy} at {sum(len(s) for s in segs):,} tokens (Llama-3-8B shape, random bf16)

Card: {machine()}. Per request (mean of {args.repeats}, profiler on): wall {wall * 1000:.1f} ms,
engine TTFT {sum(ttfts) / len(ttfts) * 1000:.1f} ms, summed GPU kernel time {gpu_us / 1000:.1f} ms,
{launches:,.0f} kernel launches. Wall far above kernel time means the link is bound by
host-side work (Python, plans, launches), not by the GPU.

Top GPU operators (ms per request):

| operator | calls | GPU ms |
|---|---|---|
{rows_gpu}

Top CPU operators by self time (ms per request):

| operator | calls | CPU ms |
|---|---|---|
{rows_cpu}
"""
    write_section(f"gpu_profile-{args.policy}-{args.context}", body)
    print(body)


if __name__ == "__main__":
    main()
