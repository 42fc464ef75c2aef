"""GPU: the SGLang plugin's attention over shared documents, alone (no server): decode steps,
and a link pass (`--part link`).

    python benchmarks/gpu_plugin_decode.py [--part decode link] [--context 32768] [--batches 1 8 32]
                                           [--link-contexts 16384 32768] [--repeats 20]

Where a linked decode step's extra time goes (`sglang_pic.py --part speed` gives the whole
step inside a server). Llama-3-8B's attention shape (32 query heads, 8 KV heads, head dim
128), random bf16 KV; `batch` requests over the same legolink-16 layout of 512-token
documents (each its own private row: exact head, the recomputed first 16 tokens of every
document, the question, one generated token), the documents' slots shared. Timed over 32
layers' attention (one plan), CUDA events, median of `--repeats`, each inside a CUDA graph as
SGLang's decode runs it:

- SGLang exact: SGLang's decode wrapper (tensor cores) over each request's whole row of
  prompt KV (what SGLang's own decode reads for a request whose prompt is all its own);
- linked: the plugin's `epic` decode graph (`decode_graphs.DecodeGraph`): SGLang's wrapper
  over the private row, the queries rotated per cached run, the shared entries, the merge;
- its parts, each alone in its own graph: the private row alone, the rotation alone, the shared entries alone,
  the merge alone;
- with one shared entry per document run holding every request's query (the plugin's: the run's
  keys read once for the batch) and with one entry per request and run (each request reads
  every run again: what the plugin planned before).

`--part link`: one legolink-16 request's link pass (its private tokens: the recomputed first 16 of
each document and the question; the head an exact prefix), eager, as SGLang runs link passes, 32
layers: the whole `LinkWrapper` and its parts alone (SGLang's causal entry over the row, in FA2
as SGLang runs it and in FA3, the
queries rotated once per document they follow, the shared entries, the zero fill FlashInfer would
give a shared output it allocated (the plugin passes an unfilled one), the merge at several tunings). The merge's floor is its bytes (the
parts' outputs read once, the rows' read and written) at the card's copy bandwidth, measured here.
Writes its tables to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang.link_plan import plan_spans  # noqa: E402
from epic_sglang.merge_states import merge_into  # noqa: E402
from epic_sglang.sglang_plugin import attention, decode_graphs  # noqa: E402
from epic_sglang.sglang_plugin import entries as fi_entries  # noqa: E402
from epic_sglang.sglang_plugin import gathered  # noqa: E402
from epic_sglang.sglang_plugin.layout import RowLayout, plan_rows  # noqa: E402
from epic_sglang.sglang_plugin.link_request import SharedRuns  # noqa: E402
from epic_sglang.sglang_plugin.rotary import RopeTable, rotated_rows  # noqa: E402

LAYERS, Q_HEADS, KV_HEADS, DIM, DOC, HEAD, QUESTION, K = 32, 32, 8, 128, 512, 32, 64, 16
BF16, DEV = torch.bfloat16, torch.device("cuda")


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 2):  # two warm-ups
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[2:])


def graphed(fn):
    """`fn` captured in a CUDA graph (run once first: kernels compile outside the capture)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def decode_wrapper(workspace, bs: int, keys: int):
    import flashinfer

    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
        paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=DEV),
        paged_kv_indices_buffer=torch.zeros(keys, dtype=torch.int32, device=DEV),
        paged_kv_last_page_len_buffer=torch.ones(bs, dtype=torch.int32, device=DEV))


def plan_rows_of(wrapper, rows: list[torch.Tensor]) -> None:
    wrapper.plan(fi_entries.indptr([len(r) for r in rows]), torch.cat(rows).int(), fi_entries.last_page_lens(len(rows)), Q_HEADS, KV_HEADS, DIM, 1,
                 q_data_type=BF16, kv_data_type=BF16)


def legolink_request(context: int) -> tuple[int, RowLayout, RopeTable]:
    """A legolink-16 request's prompt length, row layout (the head an exact prefix) and RoPE
    table (Llama-3's base), over the context's 512-token documents."""
    docs = (context - HEAD - QUESTION) // DOC
    n = HEAD + docs * DOC + QUESTION
    layout = plan_rows(plan_spans(n, [(HEAD + i * DOC, DOC, i) for i in range(docs)], K), exact_prefix_len=HEAD)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM)
    angles = torch.arange(2 * n, dtype=torch.float32)[:, None] * inv_freq
    return n, layout, RopeTable(torch.cat([angles.cos(), angles.sin()], -1).to(DEV), DIM, True)


def shared_runs(layout: RowLayout, doc_slots: torch.Tensor, identities: list) -> SharedRuns:
    """The layout's cached runs, read in place from `doc_slots`, named by `identities`."""
    runs = layout.cached_runs
    return SharedRuns(doc_slots, [c.length for c in runs], torch.tensor([c.start - c.offset for c in runs]),
                      identities, [c.doc for c in runs])


def measure(context: int, bs: int, repeats: int, order: str) -> str:
    n, layout, rope = legolink_request(context)
    private = len(layout.order) + 1  # + the generated token
    pool_size = layout.reused_tokens + bs * private
    k_pool = torch.randn(pool_size, KV_HEADS, DIM, device=DEV, dtype=BF16)
    v_pool = torch.randn_like(k_pool)
    doc_slots = torch.arange(layout.reused_tokens, device=DEV, dtype=torch.int32)  # shared by every request
    rows = [layout.reused_tokens + r * private + torch.arange(private, device=DEV) for r in range(bs)]
    full_rows = [torch.cat([doc_slots.long(), row]) for row in rows]  # SGLang exact: the same KV bytes, all its own
    runs = layout.cached_runs
    # "run": one run identity for every request (one entry per run, as the plugin plans them);
    # "request": each request's runs their own (one entry per request and run)
    run_ids = {"run": lambda r: [(c.doc, c.offset, c.length) for c in runs],
               "request": lambda r: [(r, c.doc, c.length) for c in runs]}[order]
    links = {r: types.SimpleNamespace(layout=layout, extending=False, position_shift=layout.reused_tokens,
                                      shared=shared_runs(layout, doc_slots, run_ids(r)))
             for r in range(bs)}
    batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(req_pool_idx=r) for r in range(bs)], extend_lens=[1] * bs,
                                  seq_lens_cpu=torch.tensor([private] * bs), device=DEV,
                                  req_to_token_pool=types.SimpleNamespace(req_to_token=torch.stack(rows).int()))
    plan = attention.build_plan(batch, links, rope, decode=True)
    q = torch.randn(bs, Q_HEADS, DIM, device=DEV, dtype=BF16)
    kv, scale = (k_pool, v_pool), DIM ** -0.5
    workspace = torch.empty(384 << 20, dtype=torch.uint8, device=DEV)

    exact = decode_wrapper(workspace, bs, bs * (n + 1))
    plan_rows_of(exact, full_rows)
    exact_ms = median_ms(graphed(lambda: [exact.forward(q, kv, sm_scale=scale) for _ in range(LAYERS)]), repeats)

    own = decode_wrapper(workspace, bs, bs * private)
    plan_rows_of(own, rows)
    backend = types.SimpleNamespace(workspace_buffer=workspace, max_context_len=n + 1,
                                    indices_updater_prefill=types.SimpleNamespace(
                                        num_qo_heads=Q_HEADS, num_kv_heads=KV_HEADS, head_dim=DIM,
                                        q_data_type=BF16, data_type=BF16))
    graph = decode_graphs.captured(backend, bs, decode_graphs.graph_parts(plan, bs), rope)
    graph.fill(backend, plan)
    link = graph.link_wrapper(own)
    linked_ms = median_ms(graphed(lambda: [link.forward(q, kv, sm_scale=scale) for _ in range(LAYERS)]), repeats)

    def alone(fn) -> float:  # one part, 32 times, in its own CUDA graph
        return median_ms(graphed(lambda: [fn() for _ in range(LAYERS)]), repeats)

    own_ms = alone(lambda: own.forward(q, kv, sm_scale=scale))
    rotated = rotated_rows(rope, q, graph.merge.query_rows, graph.cos_sin)
    rotate_ms = alone(lambda: rotated_rows(rope, q, graph.merge.query_rows, graph.cos_sin))
    shared_ms = alone(lambda: fi_entries.attend_with_lse(graph.wrapper, rotated, kv, sm_scale=scale))
    out, lse = own.forward_return_lse(q, kv, sm_scale=scale)
    parts = fi_entries.attend_with_lse(graph.wrapper, rotated, kv, sm_scale=scale)
    merge_ms = alone(lambda: merge_into(out, lse, *parts, graph.merge))
    entries = len(plan.shared.entries.qo_indptr) - 1
    return (f"| {n:,} | {bs} | {order} | {len(plan.shared.spans)} / {entries} / {graph.entries} "
            f"| {exact_ms:.2f} | {linked_ms:.2f} "
            f"| {linked_ms / exact_ms:.2f}x | {own_ms:.2f} | {rotate_ms:.2f} | {shared_ms:.2f} | {merge_ms:.2f} |")


def eager_ms(fn, repeats: int) -> float:
    """`fn` for every layer, eagerly (a link pass is not graphed), median ms."""
    return median_ms(lambda: [fn() for _ in range(LAYERS)], repeats)


MERGE_TUNINGS = ((16, 1), (16, 4), (8, 1), (32, 2), (4, 1))  # (parts a step, warps); the first is the default


def measure_link(context: int, repeats: int) -> list[str]:
    """Rows of the link-pass table (one per merge tuning, the first with the whole breakdown)."""
    import flashinfer

    n, layout, rope = legolink_request(context)
    row_len, extend = len(layout.order), len(layout.extend_positions)
    k_pool = torch.randn(layout.reused_tokens + row_len, KV_HEADS, DIM, device=DEV, dtype=BF16)
    v_pool = torch.randn_like(k_pool)
    doc_slots = torch.arange(layout.reused_tokens, device=DEV, dtype=torch.int32)
    row = layout.reused_tokens + torch.arange(row_len, device=DEV)
    link = types.SimpleNamespace(layout=layout, extending=True, blend=None, scout=None,
                                 shared=shared_runs(layout, doc_slots,
                                                    [(c.doc, c.offset, c.length) for c in layout.cached_runs]))
    batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(req_pool_idx=0)], extend_lens=[extend],
                                  seq_lens_cpu=torch.tensor([row_len]), device=DEV,
                                  req_to_token_pool=types.SimpleNamespace(req_to_token=row[None].int()))
    plan = attention.build_plan(batch, {0: link}, rope)
    workspace = torch.empty(384 << 20, dtype=torch.uint8, device=DEV)
    backend = types.SimpleNamespace(indices_updater_prefill=types.SimpleNamespace(
        num_qo_heads=Q_HEADS, num_kv_heads=KV_HEADS, head_dim=DIM, q_data_type=BF16, data_type=BF16))
    # the private row's causal entry: SGLang's prefill wrapper (FA2, as SGLang builds it), and FA3
    own = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")
    own_fa3 = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty_like(workspace), "NHD")
    shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty_like(workspace), "NHD")
    fi_entries.plan_entries(own, backend, plan.local, causal=True)
    fi_entries.plan_entries(own_fa3, backend, plan.local, causal=True)
    fi_entries.plan_entries(shared, backend, plan.shared.entries, causal=False)
    torch.cuda.synchronize()
    q = torch.randn(extend, Q_HEADS, DIM, device=DEV, dtype=BF16)
    kv, scale = (k_pool, v_pool), DIM ** -0.5
    merge = plan.shared.merge
    wrapper = attention.LinkWrapper(own, shared, plan.shared.cos_sin, merge, rope)
    linked_ms = eager_ms(lambda: wrapper.forward(q, kv, causal=True, sm_scale=scale), repeats)
    gathered_wrapper = gathered_link(plan, rope, torch.empty_like(workspace), backend.indices_updater_prefill)
    gathered_ms = eager_ms(lambda: gathered_wrapper.forward(q, kv, causal=True, sm_scale=scale), repeats)
    gap = (gathered_wrapper.forward(q, kv, causal=True, sm_scale=scale).float()
           - wrapper.forward(q, kv, causal=True, sm_scale=scale).float()).abs().max().item()
    own_ms = eager_ms(lambda: own.forward_return_lse(q, kv, causal=True, sm_scale=scale), repeats)
    own_fa3_ms = eager_ms(lambda: own_fa3.forward_return_lse(q, kv, causal=True, sm_scale=scale), repeats)
    rotated = rotated_rows(rope, q, merge.query_rows, plan.shared.cos_sin)
    rotate_ms = eager_ms(lambda: rotated_rows(rope, q, merge.query_rows, plan.shared.cos_sin), repeats)
    shared_ms = eager_ms(lambda: fi_entries.attend_with_lse(shared, rotated, kv, sm_scale=scale), repeats)
    fill_ms = eager_ms(lambda: torch.zeros_like(rotated), repeats)
    out, lse = own.forward_return_lse(q, kv, causal=True, sm_scale=scale)
    parts = fi_entries.attend_with_lse(shared, rotated, kv, sm_scale=scale)
    # the merge's bytes: every part's output and log-sum-exp read, each merged row read and written
    part_bytes = parts[0].numel() * parts[0].element_size() + parts[1].numel() * 4
    row_bytes = 2 * (len(merge.rows) * Q_HEADS * (DIM * out.element_size() + 4))
    src = torch.empty(part_bytes + row_bytes, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    copy_ms = eager_ms(lambda: dst.copy_(src), repeats)  # read + write: twice the merge's traffic
    floor_ms = copy_ms / 2
    rows = []
    for chunk, warps in MERGE_TUNINGS:
        merge_ms = eager_ms(lambda: merge_into(out, lse, *parts, merge, chunk=chunk, num_warps=warps), repeats)
        head = (f"| {n:,} | {extend:,} | {len(merge.query_rows):,} | {linked_ms:.2f} | {gathered_ms:.2f} | {gap:.4f} "
                f"| {own_ms:.2f} / {own_fa3_ms:.2f} | {rotate_ms:.2f} | {shared_ms:.2f} | {fill_ms:.2f}"
                if not rows else "| | | | | | | | | | ")
        rows.append(f"{head} | {chunk} x {warps} | {merge_ms:.2f} | {floor_ms:.2f} |")
    return rows


def gathered_link(plan: attention.LinkAttentionPlan, rope: RopeTable, workspace: torch.Tensor,
                  updater) -> gathered.GatheredWrapper:
    """The plan's link pass with its keys gathered in prompt order (what `EPIC_SGLANG_LINK_ATTENTION=gathered` plans)."""
    passes = gathered.plan_pass(plan.linked, plan.req_to_token, rope, DEV)
    backend = types.SimpleNamespace(workspace_buffer=workspace, indices_updater_prefill=updater)
    return gathered.plan_flashinfer(backend, passes, rope)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["decode", "link"], nargs="+", default=["decode"])
    ap.add_argument("--context", type=int, default=32768, help="decode steps' context")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--link-contexts", type=int, nargs="+", default=[16384, 32768])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    if "link" in args.part:
        link_rows = [row for context in args.link_contexts for row in measure_link(context, args.repeats)]
        print("\n".join(link_rows), flush=True)
        write_section("gpu_plugin_link", f"""## GPU: the plugin's link-pass attention over shared documents, alone (Llama-3-8B attention shape)

Card: {machine()}. One legolink-16 request's link pass over 512-token documents in shared slots
(32-token head as an exact prefix, the first 16 tokens of each document and a 64-token question
computed), {LAYERS} layers, eager, ms (median of {args.repeats}): the whole `LinkWrapper`; the same pass
with its keys gathered in prompt order (`gathered.py`, `EPIC_SGLANG_LINK_ATTENTION=gathered`: a scratch
of every key rotated once a layer, the engine's cascade entries over it), and the largest difference
between the two outputs (bf16; the same attention computed two ways); then each part of the first
alone: SGLang's causal entry over the private row (FlashInfer's FA2, as SGLang builds its prefill
wrappers; and FA3 beside it), the queries rotated once per document they
follow (`rotated rows`), the shared entries (FlashInfer, non-causal, into an unfilled output), the
zero fill FlashInfer's `run` would give an output it allocates (what the unfilled one saves), and the
merge (`merge_states`) at each tuning (parts a step x warps; the first is the default), with its
floor: its bytes at this card's measured copy bandwidth.

| context | computed tokens | rotated rows | linked ms | gathered ms | gathered vs linked, max abs diff | private row ms, FA2 (SGLang's) / FA3 | rotation ms | shared entries ms | zero fill ms | merge tuning | merge ms | merge floor ms |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(link_rows)}
""")
    if "decode" not in args.part:
        return
    rows = []
    for bs in args.batches:
        for order in ("run", "request"):
            try:
                rows.append(measure(args.context, bs, args.repeats, order))
            except RuntimeError as e:  # e.g. a kernel's scratch beyond the workspace: the other variants still run
                rows.append(f"| | {bs} | {order} | failed: "
                            f"{str(e).splitlines()[0][:120]} | | | | | | | |")
            print(rows[-1], flush=True)
    write_section("gpu_plugin_decode", f"""## GPU: the plugin's decode-step attention over shared documents, alone (Llama-3-8B attention shape)

Card: {machine()}. {LAYERS} layers' attention of one decode step (ms, median of {args.repeats}; each inside a CUDA graph,
the parts each alone in its own): `batch` legolink-16 requests over the same 512-token documents
(shared slots, read in place), each its own private row; SGLang exact = SGLang's decode wrapper over
each request's whole prompt KV (the documents' slots too, so the batch's requests read the same
bytes, as SGLang's radix cache shares one prompt: L2 serves part of them). Shared: the step's parts (request x run) /
its entries / the `epic` graph's entries (the rest padding). Variant: one entry per document
run with every request's query (the plugin's) or one per request and run.

| context | batch | variant | shared parts / entries / graph's | SGLang exact ms | linked ms | linked / exact | private row ms | rotation ms | shared entries ms | merge ms |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
""")


if __name__ == "__main__":
    main()
