"""GPU: where a linked request's time goes inside a real SGLang server with the plugin.

    python benchmarks/sglang_profile.py --tokenizer DIR [--context 16384] [--policy legolink-16 ...]
                                        [--new-tokens 4] [--out DIR]

One plugin server (Llama-3-8B shape, dummy bf16 weights), the context's 512-token documents
compiled, three warm-up requests, then SGLang's own torch profiler (`/start_profile`,
`/stop_profile`) around one linked request (its link pass and `--new-tokens` - 1 decode
steps), for each policy in turn. Prints the GPU kernels by total time and the host ops by inclusive time, from the
trace SGLang writes (`--with-stack`: Python functions too, the plugin's listed apart; the
profiler then slows every Python call several-fold, so read their shares, not their times).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_ttft import LLAMA_8B, model_dir, segments  # noqa: E402
from benchmarks.sglang_pic import PORT, compile_documents, generate, prompt  # noqa: E402
from benchmarks.torch_trace import complete_events  # noqa: E402
from epic_sglang.sglang_plugin import client  # noqa: E402
from epic_sglang.sglang_plugin.launch import SGLangServer  # noqa: E402


def summarize(trace: Path, top: int) -> None:
    kernels, host, runtime = defaultdict(float), defaultdict(float), defaultdict(float)
    launches = 0
    for e in complete_events(trace):
        if e.get("cat") == "kernel":
            kernels[e["name"][:90]] += e["dur"]
            launches += 1
        elif e.get("cat") in ("cpu_op", "user_annotation", "python_function"):
            host[e["name"][:90]] += e["dur"]
        elif e.get("cat") == "cuda_runtime":  # where the host waits on the device (syncs, pageable copies)
            runtime[e["name"][:90]] += e["dur"]
    print(f"GPU kernels: {sum(kernels.values()) / 1000:.1f} ms in all, {launches} launches")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1000:8.2f} ms  {name}")
    print("host ops (inclusive):")
    for name, us in sorted(host.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1000:8.2f} ms  {name}")
    print("CUDA runtime calls (host time):")
    for name, us in sorted(runtime.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {us / 1000:8.2f} ms  {name}")
    print("the plugin's own functions (inclusive):")
    for name, us in sorted(((n, us) for n, us in host.items() if "epic_sglang" in n or "radix_ext" in n),
                           key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1000:8.2f} ms  {name}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--policy", nargs="+", default=["legolink-16"])
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--with-stack", action="store_true",
                    help="Python stacks too: the plugin's functions listed, but every Python call slowed several-fold")
    ap.add_argument("--out", type=Path, default=Path("/tmp/epic-profile"))
    ap.add_argument("--logs", type=Path, default=Path("/tmp"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    flags = ["--load-format", "dummy", "--dtype", "bfloat16", "--context-length", str(args.context + 2048),
             "--mem-fraction-static", "0.85", "--cuda-graph-max-bs", "8"]
    params = {"max_new_tokens": args.new_tokens, "temperature": 0.0, "ignore_eos": True}
    with SGLangServer(model_dir(LLAMA_8B, args.tokenizer), PORT, plugin=True, extra=flags,
                      log_path=args.logs / "sglang_profile_server.log") as url:  # gpu_run.sh keeps this script's output as sglang_profile.log
        n_docs = (args.context - 32 - 64) // 512
        docs = [s for s in segments(n_docs, 512, 0, 0, LLAMA_8B["vocab_size"], seed=args.context) if s.document is not None]
        compile_documents(url, docs)
        walls = {}
        for policy in args.policy:  # one server: the policies' profiles compare
            for seed in range(3):
                generate(url, client.generate_body(prompt(docs, 500 + seed), policy, params))
            out = args.out / policy
            requests.post(url + "/start_profile", json={"output_dir": str(out), "activities": ["CPU", "GPU"],
                                                        "with_stack": args.with_stack}, timeout=120).raise_for_status()
            t0 = time.perf_counter()
            generate(url, client.generate_body(prompt(docs, 900), policy, params))
            walls[policy] = time.perf_counter() - t0
            requests.post(url + "/stop_profile", timeout=600).raise_for_status()
    for policy, wall in walls.items():
        print(f"\n{policy} at {args.context:,} tokens, {args.new_tokens} new tokens: {wall * 1000:.1f} ms "
              f"over HTTP (under the profiler)")
        traces = sorted((args.out / policy).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
        if not traces:
            raise SystemExit(f"no trace under {args.out / policy}")
        summarize(traces[-1], args.top)

if __name__ == "__main__":
    main()
