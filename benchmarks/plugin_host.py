"""CPU: the SGLang plugin's host work for one linked request, with SGLang's real cache classes.

    python benchmarks/plugin_host.py [--contexts 16384 32768] [--repeats 20] [--batch 32]
                                     [--policies legolink-16 querylink-16]

A linked request's time to first token inside SGLang includes host work that no GPU hides:
the scheduler matches the request (`LinkRequest.match`: every document looked up in the
`epic` radix cache, the row planned), then the forward's set-up plans the link attention
(`attention.build_plan` for the link pass, again for each decode step, and the `epic` decode
graph's padded entries). This times each on a real `PICRadixCache` over SGLang's
`MHATokenToKVPool` holding the context's 512-token documents (the prompt of `sglang_pic.py
--part speed`: a 32-token head, the documents, a 64-token question). A querylink request's
picks are made here from a random mass (no model), then its link pass is planned over them;
its cached runs and the query rows its shared parts rotate are reported beside the times (and
what they would be with one entry per run, as the plugin planned them before `run_groups`). The
profile of a 32K request in a real server (`gpu_run.sh sglang-profile --context 32768`)
showed the same functions on its critical path.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import types
from array import array
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402

DOC, HEAD, QUESTION = 512, 32, 64


def cache_with_documents(docs: list[list[int]]):
    """A `PICRadixCache` on CPU whose documents are `docs` (compiled plainly, namespace "ns")."""
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from epic_sglang.sglang_plugin.link_request import recipe
    from radix_ext import KVLayout, PICRadixCache
    from radix_ext.doc_key import document_key

    size = sum(map(len, docs)) + 4096
    kv = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=1, head_dim=8, layer_num=1,
                          device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size, torch.float32, "cpu", kv, False)
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(4, size, "cpu", False),
                             token_to_kv_pool_allocator=allocator, page_size=1)
    cache = PICRadixCache(params, kv, KVLayout(1, 1, 8, torch.float32), "fp-bench")
    for doc in docs:
        cache.insert_document(document_key(cache.fingerprint, recipe(0), "ns", doc), doc, allocator.alloc(len(doc)),
                              namespace="ns", recipe=recipe(0))
    return cache


def timed(fn, repeats: int) -> float:
    """Median ms of `repeats` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def measure(context: int, repeats: int, batch: int, policy: str) -> str:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.sampling.sampling_params import SamplingParams

    from epic_sglang.link_plan import querylink_pick
    from epic_sglang.policies import parse_policy
    from epic_sglang.sglang_plugin import attention, client, decode_graphs
    from epic_sglang.sglang_plugin.link_request import LinkRequest
    from epic_sglang.sglang_plugin.rotary import RopeTable

    rng = random.Random(context)
    n_docs = (context - HEAD - QUESTION) // DOC
    docs = [[rng.randrange(1000, 60000) for _ in range(DOC)] for _ in range(n_docs)]
    ids = [rng.randrange(1000, 60000) for _ in range(HEAD)] + sum(docs, []) + [rng.randrange(1000, 60000) for _ in range(QUESTION)]
    spans = tuple((HEAD + i * DOC, HEAD + (i + 1) * DOC) for i in range(n_docs))
    cache = cache_with_documents(docs)
    hint = client.link_hint(parse_policy(policy), "ns", spans)
    req = Req("r0", "", array("q", ids), SamplingParams(max_new_tokens=16))

    prompt, params = array("q", ids), MatchPrefixParams(key=RadixKey(array("q", ids), "ns"), req=req)

    def match() -> LinkRequest:  # a request's first match (SGLang's Req holds its ids as an array)
        link = req.epic_link = LinkRequest(hint, prompt)
        link.match(cache, params)
        return link

    match_ms = timed(match, repeats)
    link = match()
    rematch_ms = timed(lambda: link.match(cache, params), repeats)  # the same request, its next round
    if link.scout is not None:  # querylink: picks by a random mass, as its scout would hand them over
        mass = torch.rand(len(ids), generator=torch.Generator().manual_seed(context))
        link.take_picks(req, querylink_pick(mass, link.scout.plan, link.scout.block).numpy())
    layout = link.layout
    dim = 128
    angles = torch.arange(2 * context, dtype=torch.float32)[:, None] * (1.0 / 10000 ** (torch.arange(0, dim, 2) / dim))
    rope = RopeTable(torch.cat([angles.cos(), angles.sin()], -1), dim, True)
    row = torch.arange(len(layout.order) + 1, dtype=torch.int32)

    def plan(decoding: bool, bs: int = 1):
        """The plan of `bs` copies of the request (the same documents: entries regrouped by run)."""
        batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(req_pool_idx=0)] * bs, extend_lens=[layout.extend_len] * bs,
                                      seq_lens_cpu=torch.tensor([len(layout.order) + decoding] * bs),
                                      device=torch.device("cpu"), req_to_token_pool=types.SimpleNamespace(req_to_token=row[None]))
        link.extending = not decoding
        return attention.build_plan(batch, dict.fromkeys(range(bs), link), rope, decoding)

    link_pass_ms = timed(lambda: plan(False), repeats)
    os.environ["EPIC_SGLANG_LINK_ATTENTION"] = "gathered"  # the same pass over its keys gathered (`gathered.py`)
    try:
        assert plan(False).gathered is not None
        gathered_ms = timed(lambda: plan(False), repeats)
    finally:
        del os.environ["EPIC_SGLANG_LINK_ATTENTION"]
    rotated = int(plan(False).shared.merge.query_rows.numel())
    per_run = sum(layout.extend_len - s for s in layout.run_query_starts())  # were each run its own entry
    decode_ms = timed(lambda: plan(True), repeats)
    decode_batch_ms = timed(lambda: plan(True, batch), repeats)
    step = plan(True, batch)
    tier = decode_graphs.graph_parts(step, batch)
    pad_ms = timed(lambda: decode_graphs.PaddedEntries.of(step.shared, batch, tier), repeats)
    return (f"| {policy} | {len(ids):,} | {n_docs} | {len(layout.cached_runs)} | {rotated:,} | {per_run:,} | {match_ms:.2f} "
            f"| {rematch_ms:.3f} | {link_pass_ms:.2f} | {gathered_ms:.2f} | {decode_ms:.2f} | {decode_batch_ms:.2f} | {pad_ms:.2f} "
            f"| {decode_graphs.graph_rows(batch, tier):,} ({tier}) / {decode_graphs.graph_rows(batch, max(decode_graphs.PART_TIERS)):,} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32, help="requests in the timed decode step (the RAG load reaches 128)")
    ap.add_argument("--policies", nargs="+", default=["legolink-16", "querylink-16"])
    args = ap.parse_args()
    torch.set_num_threads(1)  # SGLang's scheduler is one Python thread
    rows = [measure(c, args.repeats, args.batch, p) for c in args.contexts for p in args.policies]
    write_section("sglang-plugin-host" + ("" if args.batch == 32 else f"-batch{args.batch}"), f"""## SGLang plugin: host work of one linked request (CPU)

Machine: {machine()}, one thread. SGLang 0.5.16's `PICRadixCache` / `MHATokenToKVPool` on CPU;
512-token documents (a 32-token head, the documents, a 64-token question; querylink's picks
from a random mass), median ms of the calls the scheduler and the forward's set-up make for one request (batch
{args.batch}: {args.batch} such requests decoding together). SGLang matches a waiting request twice every scheduling round
(its policy's ordering, then the admission). The link pass is planned both ways it can attend: over the
documents' shared slots (the default) and over its keys gathered in prompt order (`EPIC_SGLANG_LINK_ATTENTION=gathered`).
The plans' tensor work (gathering slots: a million at
batch 32 and 32K) runs here on the CPU; on a GPU it is queued, so these times bound the host's share.
The last column counts the query rows the step's decode graph rotates and attends in every layer,
padding included: in the smallest tier that holds the step (its documents per request in brackets),
and in the largest (`decode_graphs.PART_TIERS`).

| policy | prompt tokens | documents | cached runs | rotated query rows, link pass | the same, one entry per run | match ms | match again, next round ms | link-pass plan ms | gathered link-pass plan ms | decode-step plan ms, batch 1 | batch {args.batch} | decode-graph padding ms, batch {args.batch} | decode-graph rows, batch {args.batch}: its tier / the largest |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
""")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
