"""GPU: compile FlashInfer's and Triton's kernels for a model shape ahead of a run, one
process per link mode in parallel (FlashInfer specializes its kernels by head dim, dtype and
RoPE mode; a first use compiles each for a minute or more, one after another).

    python benchmarks/gpu_warm.py --tokenizer DIR --head-dim 64 --heads 14 --kv-heads 2

Kernels go to the JIT caches (~/.cache), where the next run finds them.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_ttft import LLAMA_8B, model_dir, segments  # noqa: E402


def warm(args: argparse.Namespace, mode: str) -> None:
    from epic_sglang import Engine, Request, SamplingParams

    config = LLAMA_8B | dict(hidden_size=args.heads * args.head_dim, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim)
    engine = Engine(str(model_dir(config, args.tokenizer)), device="cuda", load_format="dummy", kv_cache_gb=1,
                    link_mode=mode, max_requests=8)
    long = segments(8, 300, 40, 20, LLAMA_8B["vocab_size"], seed=1)  # dense compile + a multi-run link
    for policy in ("fr", "legolink-16", "querylink-16", "cacheblend-15"):
        engine.generate_batch([Request(segments=long, policy=policy, sampling=SamplingParams(max_new_tokens=3))] * 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--head-dim", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--kv-heads", type=int, required=True)
    ap.add_argument("--mode", default=None, help="one link mode (the parent starts one process per mode)")
    args = ap.parse_args()
    if args.mode:
        return warm(args, args.mode)
    t0 = time.perf_counter()
    procs = {m: subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--mode", m])
             for m in ("auto", "gathered", "cascade", "fused", "mask")}
    failed = [m for m, p in procs.items() if p.wait() != 0]
    print(f"warm: head_dim {args.head_dim}, {len(procs) - len(failed)} link modes in {time.perf_counter() - t0:.0f}s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
