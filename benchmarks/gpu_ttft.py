"""GPU: check the FlashInfer backend against the torch reference, then time every policy.

    python benchmarks/gpu_ttft.py --tokenizer DIR [--contexts 4096 8192 16384 32768]

One run does everything on a Llama-3.1-8B-shaped model with random bf16 weights (speed
does not depend on weight values):
1. correctness: for every policy, FlashInfer (every link mode) against the torch reference
   backend on the same weights and pool (first-token logits);
2. TTFT of fr, cacheblend-15, legolink-16, querylink variants and naive for each context (512-token
   documents + a 64-token question, documents precompiled), and the floor: one forward of
   the same number of new tokens as legolink-16 over an already cached context of the same length;
3. link modes (`gathered`, `fused`, `mask`, ...): legolink-16, the first querylink variant, naive and the floor under each.
Writes its tables to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang import Engine, Request, SamplingParams  # noqa: E402
from epic_sglang.attention import make_attention  # noqa: E402
from epic_sglang.attention.flashinfer_backend import LINK_MODES  # noqa: E402
from epic_sglang.engine import GenerateResult  # noqa: E402
from epic_sglang.linker import Linker  # noqa: E402
from epic_sglang.link_plan import CascadeTuning, LinkPlan  # noqa: E402
from epic_sglang.policies import Segment  # noqa: E402

# Llama-3-8B's shape (Llama-3.1-8B's, less its llama3 RoPE scaling, which `--rope llama3`
# adds back), with the vocabulary of the tokenizer we ship (49,152), as in the SGLang
# reference runs made with the same config.
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "vocab_size": 49152,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
POLICIES = ["fr", "cacheblend-15", "legolink-16", "naive"]  # + --querylink variants (default querylink-16)
CHECK_POLICIES = ["fr", "naive", "legolink-1", "legolink-16", "legolink0", "cacheblend-15", "querylink-16"]



def model_dir(config: dict, tokenizer: Path) -> Path:
    out = Path(tempfile.mkdtemp(prefix="epic-model-"))
    (out / "config.json").write_text(json.dumps(config))
    for f in tokenizer.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def random_checkpoint(config: dict, tokenizer: Path, out: Path, widen: bool, seed: int = 0):
    """A real checkpoint (safetensors + tokenizer) of `config`'s architecture with random
    weights, for checks that compare two runtimes on the same weights. `widen`: peaky
    logits, so greedy tokens are well defined. Returns the transformers model (fp32)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if widen:
        with torch.no_grad():
            for p in hf.parameters():
                p.normal_(0, 0.08) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(out)
    for f in tokenizer.iterdir():
        if f.is_file() and f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    return hf


def segments(num_docs: int, doc_tokens: int, question_tokens: int, head_tokens: int, vocab: int,
             seed: int = 0) -> list[Segment]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: tuple(torch.randint(100, vocab, (n,), generator=g).tolist())  # noqa: E731
    return ([Segment(ids(head_tokens))] + [Segment(ids(doc_tokens), document=i) for i in range(num_docs)]
            + [Segment(ids(question_tokens))])


def floor_segments(segs: list[Segment], new: int) -> list[Segment]:
    """The floor's prompt: the same tokens as one cached block, then `new` tokens to compute
    (with `naive` after compiling the block: one dense forward over a cached context)."""
    tokens = tuple(t for s in segs for t in s.token_ids)
    return [Segment(tokens[:-new], document=0), Segment(tokens[-new:])]


def first_token(engine: Engine, segs: list[Segment], policy: str) -> tuple[torch.Tensor, float]:
    r = first_result(engine, segs, policy)
    return r.first_logits, r.stats.ttft_s


def first_result(engine: Engine, segs: list[Segment], policy: str):
    r = engine.generate_batch([Request(segments=segs, policy=policy, return_first_logits=True,
                                       sampling=SamplingParams(max_new_tokens=1, ignore_eos=True))])[0]
    assert policy == "fr" or r.stats.compiled_tokens == 0, "documents must be precompiled"
    return r


def linked(engine: Engine, request: Request, positions) -> tuple[GenerateResult, int]:
    """`request` linked with `positions` recomputed beyond its policy's plan (None: none): its
    result and how many prompt tokens the link recomputed."""
    s = engine.admit(request)
    if positions is not None:
        s.plan.recompute[positions] = True
    recomputed = int(s.plan.recompute.sum())
    engine.prefill([s])
    engine.step([s], [])
    return engine.finish(s), recomputed


def link_of(engine: Engine, segs: list[Segment], positions: list[int]) -> torch.Tensor:
    """First-token logits of a plain link recomputing exactly `positions` (naive's plan plus
    them): what querylink runs once its scout has picked."""
    return linked(engine, Request(segments=segs, policy="naive", return_first_logits=True,
                                  sampling=SamplingParams(max_new_tokens=1, ignore_eos=True)), positions)[0].first_logits


def scout_of(engine: Engine, segs: list[Segment], policy: str) -> tuple[torch.Tensor, LinkPlan]:
    """querylink's scout mass for the prompt (nothing linked), and the plan it scouted for."""
    s = engine.admit(Request(segments=segs, policy=policy, sampling=SamplingParams(max_new_tokens=1)))
    try:
        engine.prefill([s])
        return engine.scout_mass([s])[0].float().cpu(), s.plan
    finally:
        engine.finish(s)


def with_attention(engine: Engine, name: str, link_mode: str = "auto", tuning: CascadeTuning = CascadeTuning()) -> None:
    engine.linker = Linker(engine.model, engine.pool,
                           make_attention(name, engine.config, engine.device, engine.dtype, link_mode, tuning))


def check_against_reference(engine: Engine, segs: list[Segment], min_cosine: float,
                            tuning: CascadeTuning = CascadeTuning()) -> list[str]:
    """FlashInfer (every link mode, cascades cut by `tuning`) vs the torch reference for
    every policy. Both run in bf16 and round differently, so the bar is a cosine on the
    first-token logits; its value depends on depth (bf16 drift grows with layers)."""
    engine.compile_segments(segs, "legolink-16")
    engine.compile_segments(segs, "legolink0")
    rows = []
    cosine = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()  # noqa: E731
    for policy in CHECK_POLICIES:
        scouts = policy.startswith("querylink")
        with_attention(engine, "torch")
        ref = first_result(engine, segs, policy)
        ref_mass = scout_of(engine, segs, policy)[0] if scouts else None
        for mode in LINK_MODES:
            with_attention(engine, "flashinfer", mode, tuning)
            r = first_result(engine, segs, policy)
            # querylink: in bf16 the scout's picks may differ near ties (random weights attend
            # almost evenly), so the scout is checked by its mass and the link on the
            # reference's picks; the share of positions both picked is reported
            shared = len(set(r.recomputed_positions) & set(ref.recomputed_positions)) / len(ref.recomputed_positions)
            got = link_of(engine, segs, ref.recomputed_positions) if scouts and shared < 1 else r.first_logits
            mass_cos = cosine(scout_of(engine, segs, policy)[0], ref_mass) if scouts else 1.0
            err = (got - ref.first_logits).abs().max().item() / ref.first_logits.abs().max().item()
            cos = cosine(got, ref.first_logits)
            same = int(got.argmax()) == int(ref.first_logits.argmax())
            ok = cos > min_cosine and mass_cos > min_cosine
            rows.append(f"| {policy} | {mode} | {shared:.3f} | {mass_cos if scouts else float('nan'):.6f} | {err:.4f} "
                        f"| {cos:.6f} | {same} | {'ok' if ok else 'FAIL'} |")
            print(rows[-1], flush=True)
            if not ok:
                raise SystemExit(f"FlashInfer {mode} differs from the torch reference for {policy}")
    with_attention(engine, "flashinfer")
    return rows


def median_ttft(engine: Engine, segs: list[Segment], policy: str, repeats: int) -> float:
    for _ in range(2):  # warm-up (kernel plans, allocator)
        first_token(engine, segs, policy)
    return statistics.median(first_token(engine, segs, policy)[1] for _ in range(repeats))


def decode_ms_per_step(engine: Engine, batch: int, context: int, steps: int = 32) -> float:
    """Median over the batch of decode time per step (32 steps after the first token)."""
    reqs = [Request(segments=segments(0, 0, context, 0, LLAMA_8B["vocab_size"], seed=1000 + i)[1:], policy="fr",
                    sampling=SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)) for i in range(batch)]
    engine.generate_batch(reqs[:1])  # warm-up
    results = engine.generate_batch(reqs)
    engine.flush_cache()
    return statistics.median(r.stats.decode_s for r in results) / steps


def decode_rows(engine: Engine, context: int) -> list[str]:
    """Decode step latency, CUDA graphs against eager launches, same engine and weights."""
    rows = []
    graphs = engine.decode_graphs
    for batch in (1, 8, 32):
        engine.decode_graphs = None
        eager = decode_ms_per_step(engine, batch, context)
        engine.decode_graphs = graphs
        graphed = decode_ms_per_step(engine, batch, context)
        rows.append(f"| {batch} | {context:,} | {eager * 1000:.2f} | {graphed * 1000:.2f} | {eager / graphed:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json (vocab 49,152)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv-cache-gb", type=float, default=24.0)
    ap.add_argument("--rope", choices=["default", "llama3"], default="default",
                    help="llama3: Llama-3.1's scaled RoPE, which FlashInfer's fused RoPE cannot do")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--link-mode", choices=LINK_MODES, default="auto", help="link mode of the main table")
    ap.add_argument("--querylink", nargs="+", default=["querylink-16"], help="querylink variants to time")
    ap.add_argument("--link-modes", nargs="+", choices=LINK_MODES, default=list(LINK_MODES),
                    help="link modes of the second table")
    ap.add_argument("--tag", default=None, help="BENCHMARKS.md section suffix, so a variant run keeps the main table")
    args = ap.parse_args()
    config = LLAMA_8B | ({"rope_scaling": LLAMA3_ROPE} if args.rope == "llama3" else {})

    t0 = time.perf_counter()
    engine = Engine(str(model_dir(config, args.tokenizer)), device="cuda", load_format="dummy",
                    kv_cache_gb=args.kv_cache_gb, max_context_len=max(args.contexts) + 1024)
    print(f"engine up in {time.perf_counter() - t0:.1f}s", flush=True)
    vocab, head = LLAMA_8B["vocab_size"], 32

    check = [] if args.skip_check else check_against_reference(
        engine, segments(4, args.doc_tokens, args.question_tokens, head, vocab, seed=1), min_cosine=0.995)

    with_attention(engine, "flashinfer", args.link_mode)
    rows, mode_rows = [], []
    for ctx in args.contexts:
        num_docs = (ctx - head - args.question_tokens) // args.doc_tokens
        segs = segments(num_docs, args.doc_tokens, args.question_tokens, head, vocab, seed=ctx)
        n = sum(len(s) for s in segs)
        engine.compile_segments(segs, "legolink-16")
        floor_segs = floor_segments(segs, new=head + num_docs * 16 + args.question_tokens)
        engine.compile_segments(floor_segs, "naive")

        def timed(policy: str) -> float:
            return median_ttft(engine, floor_segs, "naive", args.repeats) if policy == "floor" \
                else median_ttft(engine, segs, policy, args.repeats)

        timed_policies = POLICIES[:3] + args.querylink + POLICIES[3:] + ["floor"]
        ttft = {p: timed(p) for p in timed_policies}
        rows.append(f"| {n:,} | {num_docs} | " + " | ".join(f"{ttft[p] * 1000:,.1f}" for p in timed_policies)
                    + f" | {ttft['fr'] / ttft['legolink-16']:.1f}x | {ttft['cacheblend-15'] / ttft['legolink-16']:.1f}x"
                    + "".join(f" | {ttft[q] / ttft['legolink-16']:.2f}x" for q in args.querylink)
                    + f" | {ttft['legolink-16'] / ttft['floor']:.2f}x |")
        print(rows[-1], flush=True)
        mode_policies = ["legolink-16", args.querylink[0], "naive", "floor"]
        for mode in args.link_modes:  # the table's own mode was just timed
            with_attention(engine, "flashinfer", mode)
            by_mode = {p: ttft[p] if mode == args.link_mode else timed(p) for p in mode_policies}
            mode_rows.append(f"| {n:,} | {mode} | " + " | ".join(f"{t * 1000:,.1f}" for t in by_mode.values())
                             + f" | {ttft['fr'] / by_mode['legolink-16']:.1f}x"
                             + f" | {by_mode[args.querylink[0]] / by_mode['legolink-16']:.2f}x |")
            print(mode_rows[-1], flush=True)
        with_attention(engine, "flashinfer", args.link_mode)
        engine.flush_cache()

    decode = [] if args.skip_decode else decode_rows(engine, 2048)

    decode_table = f"""
Decode step latency (fr prompts of 2,048 tokens, 32 steps after the first token, median over the batch):
eager launches against CUDA graphs (one captured forward per batch bucket, FlashInfer decode with fused RoPE).

| batch | context | eager ms/step | CUDA graph ms/step | speedup |
|---|---|---|---|---|
{chr(10).join(decode)}
""" if decode else ""
    check_table = f"""
FlashInfer vs torch reference (same weights, both bf16, first-token logits; 4 x {args.doc_tokens}-token documents;
pass: cosine > 0.995; querylink: also the cosine of its scout's attention mass, and its logits are compared
on the reference's picks when its bf16 scout picked otherwise; "shared" = recomputed positions both picked):

| policy | link mode | shared | scout mass cosine | max abs err / max abs logit | cosine | same argmax | |
|---|---|---|---|---|---|---|---|
{chr(10).join(check)}
""" if check else ""
    body = f"""## GPU TTFT (Llama-3-8B shape, RoPE {args.rope}, random bf16 weights, FlashInfer backend){f" ({args.tag})" if args.tag else ""}

Card: {machine()}. {args.doc_tokens}-token documents (precompiled) + {args.question_tokens}-token question + {head}-token head;
TTFT = engine link pass + first token (no HTTP), median of {args.repeats} after two warm-ups.
The {head}-token head precedes the first document, so after the warm-ups every policy but
cacheblend takes its exact KV from the radix prefix tree (as SGLang would); all else is as listed.
Floor = one forward of legolink-16's number of new tokens over an already cached context of the same length.

| context | docs | fr ms | cacheblend-15 ms | legolink-16 ms | {" | ".join(f"{q} ms" for q in args.querylink)} | naive ms | floor ms | fr / lego | cb / lego | {" | ".join(f"{q} / lego" for q in args.querylink)} | lego / floor |
|---|---|---|---|---|{"---|" * len(args.querylink)}---|---|---|---|{"---|" * len(args.querylink)}---|
{chr(10).join(rows)}

Link mode of the table: `{args.link_mode}`. Every link mode, same prompts, timed after the table
(`gathered`: a causal entry per query run over the truncated KV, keys gathered and rotated into
scratch by one Triton launch per layer, FA2 for short runs and FA3 for dense ones; `cascade`:
gathered keys, runs grouped by {CascadeTuning().group} queries into non-causal FA3 entries over the keys before
the group ({CascadeTuning().chunk:,}-key chunks) plus a short causal FA2 entry per run, merged by log-sum-exp; `fused`: per-run entries
over the pool's keys in place, RoPE fused in FA2 (gathered where RoPE cannot fuse: llama3);
`mask`: one entry with the custom mask, FA2; `auto`: cascade when the runs' key prefixes reach
128K keys, else fused); the floor is dense in every mode (FA3); fr / lego uses the table's fr:

| context | link mode | legolink-16 ms | {args.querylink[0]} ms | naive ms | floor ms | fr / lego | {args.querylink[0]} / lego |
|---|---|---|---|---|---|---|---|
{chr(10).join(mode_rows)}
{decode_table}{check_table}"""
    write_section(f"gpu_ttft-rope-{args.rope}" + (f"-{args.tag}" if args.tag else ""), body)
    print(body)


if __name__ == "__main__":
    main()
