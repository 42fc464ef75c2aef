"""TTFT of each link policy on CPU: 8 documents of 512 tokens + a 64-token question.

    python benchmarks/cpu_link.py [--model qwen2.5-0.5b] [--repeats 2]

Documents are precompiled (the steady state of PIC), so TTFT is the link pass alone. Also
measures what storing keys un-rotated costs: the share of link and decode time spent
rotating keys at attention time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang import Engine, Request, SamplingParams  # noqa: E402
from epic_sglang.data.hotpotqa import load_hotpotqa  # noqa: E402
from epic_sglang.attention import torch_ref  # noqa: E402
from epic_sglang.policies import Segment  # noqa: E402

POLICIES = ["fr", "cacheblend-15", "legolink-16", "naive"]


def rag_segments(engine: Engine, num_docs: int, doc_tokens: int, question_tokens: int) -> list[Segment]:
    """Chat-templated prompt whose documents are exactly `doc_tokens` tokens of HotpotQA text."""
    text = " ".join(p for ex in load_hotpotqa()[:200] for p in ex.paragraphs)
    ids = engine.prompts.encode(text)
    head, tail = engine.prompts.template_parts(None)
    docs = [Segment(tuple(ids[i * doc_tokens:(i + 1) * doc_tokens]), document=i) for i in range(num_docs)]
    tail_ids = engine.prompts.encode(tail)
    question = engine.prompts.encode("Question: " + text[-4000:])[:question_tokens - len(tail_ids)] + tail_ids
    return [Segment(tuple(engine.prompts.encode(head)))] + docs + [Segment(tuple(question))]


class RopeTimer:
    """Accumulates wall time the torch reference backend spends rotating queries and keys."""

    def __init__(self):
        self.seconds = 0.0
        self._orig = torch_ref.apply_rotation

    def __enter__(self):
        def timed(x, cos, sin):
            t = time.perf_counter()
            out = self._orig(x, cos, sin)
            self.seconds += time.perf_counter() - t
            return out

        torch_ref.apply_rotation = timed
        return self

    def __exit__(self, *exc):
        torch_ref.apply_rotation = self._orig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=512)
    ap.add_argument("--question-tokens", type=int, default=64)
    args = ap.parse_args()

    engine = Engine(args.model, device="cpu")
    segments = rag_segments(engine, args.docs, args.doc_tokens, args.question_tokens)
    n = sum(len(s) for s in segments)

    def request(policy: str, new_tokens: int = 1) -> Request:
        return Request(segments=segments, policy=policy, sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))

    engine.generate_batch([request("legolink-16")])  # compile the documents once
    rows, ttft = [], {}
    for policy in POLICIES:
        runs = [engine.generate_batch([request(policy)])[0] for _ in range(args.repeats)]
        assert all(r.stats.compiled_tokens == 0 for r in runs)
        ttft[policy] = statistics.median(r.stats.ttft_s for r in runs)
        s = runs[0].stats
        rows.append(f"| {policy} | {s.prompt_tokens} | {s.recomputed_tokens} | {s.reused_tokens} | "
                    f"{ttft[policy] * 1000:,.0f} | {ttft['fr'] / ttft[policy]:.1f}x |")
        print(rows[-1], flush=True)

    with RopeTimer() as link_rope:
        t = time.perf_counter()
        engine.generate_batch([request("legolink-16")])
        link_s = time.perf_counter() - t
    with RopeTimer() as decode_rope:
        r = engine.generate_batch([request("legolink-16", 17)])[0]
    decode_rope.seconds -= link_rope.seconds  # its link pass is the same as the one above
    per_token = r.stats.decode_s / 16

    body = f"""## CPU link TTFT ({args.model}, {args.docs} x {args.doc_tokens}-token documents + {args.question_tokens}-token question)

Machine: {machine()}. Documents precompiled; TTFT = link pass + first token, median of {args.repeats}.
Prompt: {n} tokens (chat template head + documents + question).

| policy | prompt tokens | recomputed | reused | TTFT ms | speed-up vs fr |
|---|---|---|---|---|---|
{chr(10).join(rows)}

legolink-16 vs fr: **{ttft['fr'] / ttft['legolink-16']:.1f}x** lower TTFT (target >= 8x).

Un-rotated keys (RoPE applied to gathered keys at attention time): key/query rotation took
{link_rope.seconds * 1000:.0f} ms of a {link_s * 1000:.0f} ms legolink-16 link ({100 * link_rope.seconds / link_s:.1f}%) and
{decode_rope.seconds / 16 * 1000:.1f} ms of each {per_token * 1000:.0f} ms decode step ({100 * decode_rope.seconds / 16 / per_token:.1f}%)
at {n} tokens of context. The alternative, rotating each document into request-private
slots at link time, would copy {n - r.stats.recomputed_tokens} tokens x all layers of KV per request and give up
sharing one copy of a document across requests.
"""
    write_section(f"cpu_link-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
