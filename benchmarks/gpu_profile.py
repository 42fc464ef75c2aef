"""GPU: where a link's time goes (what separates it from pure kernel time).

    python benchmarks/gpu_profile.py --tokenizer DIR [--context 16384] [--policy legolink-16 | floor]

Same model and prompt as gpu_ttft.py (Llama-3-8B shape, random bf16 weights, 512-token
documents precompiled + 64-token question). Profiles `--repeats` first-token requests with
torch.profiler and reports wall time, summed GPU kernel time and the top CPU and GPU
operators; then, without the profiler, the request stage by stage (admission, querylink's
scout and pick, the link's forward, the rest), each stage ended by a device sync, with the
host's share (until the stage's call returns) beside its wall time; writes them to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_ttft import LLAMA_8B, first_token, floor_segments, model_dir, segments, with_attention  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang import Engine, Request, SamplingParams  # noqa: E402
from epic_sglang.link_plan import CascadeTuning, query_runs  # noqa: E402


def staged(engine: Engine, segs, policy: str, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (host ms, wall ms) per stage of a first-token request. Host: until the stage's
    call returns (work enqueued); wall: until the device is done with it too. Stages: scout
    (querylink's question over the cached KV), pick (its choice on the host, after the scout),
    link (plan + forward), rest (admission, sampling, release: TTFT less the others)."""
    times: dict[str, list[tuple[float, float]]] = defaultdict(list)

    def timed(name: str, fn):
        def call(*args, **kwargs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            times[name].append(((t1 - t0) * 1000, (time.perf_counter() - t0) * 1000))
            return out
        return call

    scout, link, mass = engine._scout, engine.linker.run, engine.scout_mass
    engine._scout, engine.linker.run, engine.scout_mass = timed("scout+pick", scout), timed("link", link), timed("scout", mass)
    try:
        ttfts = [first_token(engine, segs, policy)[1] * 1000 for _ in range(repeats)]
    finally:
        engine._scout, engine.linker.run, engine.scout_mass = scout, link, mass
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(2)) for k, v in times.items()}
    out = {"scout": med.get("scout", (0.0, 0.0))}
    both = med.get("scout+pick", (0.0, 0.0))
    out["pick"] = (both[0] - out["scout"][1], both[1] - out["scout"][1])  # the scout's wall is inside it
    out["link"] = med["link"]
    ttft = statistics.median(ttfts)
    out["rest"] = (float("nan"), ttft - both[1] - med["link"][1])
    out["TTFT"] = (float("nan"), ttft)
    return out


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
    stage_rows = []
    variants = [("legolink-16", "legolink-16", {}), (policy, policy, {})]
    if policy.startswith("querylink"):  # the masked local entries, their groups and the scout's graphs, A/B in one engine
        variants += [(f"{policy}, a causal FA2 local entry per run", policy, {"masked_runs": 10 ** 9}),
                     *((f"{policy}, cascade groups of {g} queries", policy, {"group": g}) for g in (32, 64)),
                     (f"{policy}, scout without CUDA graphs", policy, {"graphs": False})]
    for label, policy_name, change in variants:
        tuning = {k: v for k, v in change.items() if k != "graphs"}
        with_attention(engine, "flashinfer", tuning=CascadeTuning(**tuning))
        engine.cuda_graphs = change.get("graphs", True)
        stages = staged(engine, segs, policy_name, max(args.repeats, 5))
        r = engine.generate_batch([Request(segments=segs, policy=policy_name, sampling=SamplingParams(max_new_tokens=1))])[0]
        runs = len(query_runs(r.recomputed_positions))
        stage_rows.append(f"| {label} | {runs} | " + " | ".join(
            f"{h:.1f} / {w:.1f}" if h == h else f"{w:.1f}" for h, w in stages.values()) + " |")
        print(stage_rows[-1], flush=True)
    body += f"""
Stage by stage (no profiler; median of {max(args.repeats, 5)}; host ms / wall ms, each stage ended by a
device sync, so host ~ wall means the host paces it; runs = the link's query runs):

| policy | runs | scout | pick | link | rest | TTFT |
|---|---|---|---|---|---|---|
{chr(10).join(stage_rows)}
"""
    write_section(f"gpu_profile-{args.policy}-{args.context}", body)
    print(body)


if __name__ == "__main__":
    main()
