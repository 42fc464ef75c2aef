"""The SGLang plugin on CPU with SGLang's real scheduler classes: `Req`, `PrefillAdder`,
`ScheduleBatch.prepare_for_extend`, `ReqToTokenPool`, `MHATokenToKVPool`, the token
allocator and `release_kv_cache`, patched by the plugin's real `HookRegistry` hooks.

The model forward is the one part that needs CUDA (SGLang's kernels): here a stand-in
writes each computed token's K as RoPE(position) applied to a per-token vector, which is
what a layer stores for a token at that position. The GPU script
(`benchmarks/sglang_pic.py`) runs the real forward in a real server.
"""
from __future__ import annotations

import dataclasses
import itertools
import random
import types
from array import array

import numpy as np
import pytest
import torch

from epic_sglang.link_plan import CascadeTuning, link_entries, plan_link, plan_spans, segment_spans
from epic_sglang.policies import Segment, parse_policy
from epic_sglang.sglang_plugin import attention, client, hooks, load
from epic_sglang.sglang_plugin.layout import plan_rows
from epic_sglang.sglang_plugin.link_request import CompileRequest, LinkRequest
from epic_sglang.sglang_plugin.rotary import RopeTable
from epic_sglang.sglang_plugin.wire import HintError, LinkHint, decode
from radix_ext import KVLayout, PICRadixCache
from test_link_plan import visible_keys

HEADS, DIM, LAYERS = 2, 8, 2


@pytest.fixture(scope="module")
def sglang_runtime():
    """SGLang's process-wide server args (CPU, torch attention) and the plugin's hooks."""
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.runtime_context import get_context, get_parallel
    from sglang.srt.server_args import ServerArgs

    args = ServerArgs.__new__(ServerArgs)  # the defaults, without __post_init__'s model lookup
    for f in dataclasses.fields(ServerArgs):
        if f.default is not dataclasses.MISSING:
            setattr(args, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(args, f.name, f.default_factory())
    args.device, args.attention_backend, args.page_size = "cpu", "torch_native", 1
    context = get_context()
    previous = getattr(context, "_server_args", None)
    context.set_server_args(args)
    load()
    HookRegistry.apply_hooks()
    with get_parallel().override(tp_rank=0):  # one scheduler, no process group
        yield
    if previous is not None:
        context.set_server_args(previous)


class Scheduler:
    """One SGLang scheduler's cache state on CPU, driven the way `Scheduler` drives it."""

    def __init__(self, size: int = 1024, chunk: int | None = 4096):
        from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        self.kv = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
                                   layer_num=LAYERS, device="cpu", enable_memory_saver=False)
        self.req_pool = ReqToTokenPool(16, 512, "cpu", False)
        self.allocator = TokenToKVPoolAllocator(size, torch.float32, "cpu", self.kv, False)
        params = CacheInitParams(disable=False, req_to_token_pool=self.req_pool,
                                 token_to_kv_pool_allocator=self.allocator, page_size=1)
        self.cache = PICRadixCache(params, self.kv, KVLayout(LAYERS, HEADS, DIM, torch.float32), "fp-test")
        # SGLang's own table (its constructor wants a GPU kernel, so set the fields it reads)
        rotary = RotaryEmbedding.__new__(RotaryEmbedding)
        torch.nn.Module.__init__(rotary)
        rotary.head_size = rotary.rotary_dim = DIM
        rotary.max_position_embeddings, rotary.base, rotary.is_neox_style = 4096, 10000, True
        rotary.register_buffer("cos_sin_cache", rotary._compute_cos_sin_cache(), persistent=False)
        self.rope = RopeTable.of_model(torch.nn.Sequential(rotary))
        self.chunk = chunk
        self.rids = itertools.count()

    # ------------------------------------------------------------- what a layer writes
    @staticmethod
    def base(token: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(token)
        return torch.randn(HEADS, DIM, generator=g)

    def key(self, token: int, position: int) -> torch.Tensor:
        return self.rope.rotate(self.base(token)[None], *self.rope.angles(torch.tensor([position])))[0]

    # ------------------------------------------------------------- scheduling
    def request(self, ids, hint: LinkHint | str | None = None, max_new_tokens: int = 4):
        from sglang.srt.managers.schedule_batch import Req
        from sglang.srt.sampling.sampling_params import SamplingParams

        return Req(f"r{next(self.rids)}", "", array("q", ids), SamplingParams(max_new_tokens=max_new_tokens),
                   extra_key=hint.encode() if isinstance(hint, LinkHint) else hint)

    def prefill(self, reqs: list, tuning: CascadeTuning = CascadeTuning()) -> tuple[list, attention.LinkAttentionPlan | None]:
        """Match, admit, prepare the extend, then 'run' it: returns the admitted requests and
        the link plan the FlashInfer backend would get."""
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.managers.schedule_policy import PrefillAdder
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        adder = PrefillAdder(1, self.cache, self.allocator, None, 0.0, 8192, self.chunk)
        for req in reqs:
            req.init_next_round_input(self.cache)
            adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None)
        admitted = adder.can_run_list
        if not admitted:
            return [], None
        batch = ScheduleBatch.init_new(admitted, self.req_pool, self.allocator, self.cache,
                                       types.SimpleNamespace(is_encoder_decoder=False, vocab_size=1 << 16),
                                       False, SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        links = hooks.extending_links(batch)  # what the ForwardBatch.init_new hook does
        plan = hooks.prepare_links(links, batch, self.kv, self.rope, tuning) if links else None
        offset = 0
        for i, req in enumerate(batch.reqs):
            n = batch.extend_lens[i]
            prefix = batch.prefix_lens[i]
            positions = plan.positions.get(offset) if plan else None
            positions = positions.tolist() if positions is not None else list(range(prefix, prefix + n))
            tokens = req.full_untruncated_fill_ids[prefix:prefix + n]
            slots = batch.out_cache_loc[offset:offset + n]
            for layer in range(LAYERS):
                self.kv.k_buffer[layer][slots] = torch.stack([self.key(t, p) for t, p in zip(tokens, positions)])
                self.kv.v_buffer[layer][slots] = torch.stack([self.base(t) for t in tokens])
            offset += n
        return admitted, plan

    def finish(self, req) -> None:
        from sglang.srt.mem_cache.common import release_kv_cache

        req.output_ids.append(3)
        release_kv_cache(req, self.cache)

    def compile(self, doc: list[int], namespace: str | None = "ns", sinks: tuple[int, ...] = ()) -> None:
        req = self.request([*sinks, *doc], LinkHint(namespace, compile=True, sink=len(sinks)), max_new_tokens=0)
        assert self.prefill([req])[0] == [req]
        self.finish(req)

    def row(self, req) -> torch.Tensor:
        return self.req_pool.req_to_token[req.req_pool_idx, :len(req.full_untruncated_fill_ids)]

    def assert_row_at_prompt_positions(self, req, ids: list[int], layer: int) -> None:
        """Every slot of the request's row holds its token's K at its prompt position
        (re-rotated document copies and newly computed tokens alike)."""
        for slot, position in zip(self.row(req).tolist(), req.epic_link.layout.order.tolist()):
            torch.testing.assert_close(self.kv.k_buffer[layer][slot], self.key(ids[position], position),
                                       atol=1e-5, rtol=1e-5)


def prompt(rng: random.Random, sizes=(6, 20, 3, 17, 9)) -> tuple[list[int], list[tuple[int, int]], list[list[int]]]:
    """prefix | doc | gap | doc | question, with distinct token ids."""
    ids = list(range(1000, 1000 + sum(sizes)))
    rng.shuffle(ids)
    bounds = np.cumsum((0,) + sizes)
    spans = [(int(bounds[1]), int(bounds[2])), (int(bounds[3]), int(bounds[4]))]
    return ids, spans, [ids[s:e] for s, e in spans]


def visible_positions(plan, layout, row) -> list[tuple[int, list[int]]]:
    """(query position, positions of the keys its entries attend) for every link query of a
    batch holding this one request: causal local entries, bottom-right aligned, plus the bulk
    entries (every query of one sees all its keys) of the rows `plan.merge` names."""
    position_of_slot = {int(s): int(p) for s, p in zip(row, layout.order)}
    queries = layout.extend_positions.tolist()
    seen = [[] for _ in queries]

    def entries(e):
        qo, kv = e.qo_indptr.tolist(), e.kv_indptr.tolist()
        for i in range(len(qo) - 1):
            yield range(qo[i], qo[i + 1]), [position_of_slot[int(s)] for s in e.kv_indices[kv[i]:kv[i + 1]]]

    for rows, keys in entries(plan.local):
        for j, r in enumerate(rows):
            seen[r] += keys[:len(keys) - len(rows) + j + 1]
    if plan.bulk is not None:
        bulk_rows = plan.merge.query_rows.tolist()
        for rows, keys in entries(plan.bulk):
            for r in rows:
                seen[bulk_rows[r]] += keys
    return list(zip(queries, seen))


# ----------------------------------------------------------------- pure parts
def test_hint_round_trip_and_refusals():
    hint = LinkHint("tenant", ((3, 9), (9, 20)), 16)
    assert decode(hint.encode()) == hint
    assert decode(LinkHint(None, compile=True).encode()).compile
    assert decode(LinkHint("t", ((3, 9),), 0, sink=4).encode()).sink == 4
    assert decode(LinkHint(None, compile=True, sink=4).encode()) == LinkHint(None, compile=True, sink=4)
    with pytest.raises(HintError, match="non-empty document after its 4 sink tokens"):
        LinkHint(None, compile=True, sink=4).validate(4)
    for bad in ["epic:{", 'epic:{"docs": 3}', 'epic:{"ns": 1, "docs": []}']:
        with pytest.raises(HintError, match="epic:"):
            decode(bad)
    for docs, n in [(((3, 9), (8, 12)), 20), (((3, 30),), 20), ((), 20), (((5, 5),), 20)]:
        with pytest.raises(HintError, match="epic:"):
            LinkHint(None, docs, 4).validate(n)


@pytest.mark.parametrize("policy", ["naive", "legolink-1", "legolink-4", "legolink-16"])
def test_computed_tokens_are_the_policy_plan_of_the_in_process_engine(policy):
    rng = random.Random(policy)
    for _ in range(20):
        sizes = [rng.randint(0, 5)] + [rng.randint(1, 30) for _ in range(rng.randint(1, 4))] + [rng.randint(0, 6)]
        segments = [Segment(tuple(range(sizes[0])))] + [Segment(tuple(range(n)), document=j)
                                                        for j, n in enumerate(sizes[1:-1])] + [Segment(tuple(range(sizes[-1])))]
        segments = [s for s in segments if len(s)]
        p = parse_policy(policy)
        plan = plan_link(p, segments)
        layout = plan_rows(plan_spans(plan.num_tokens, segment_spans(segments), p.k), 0)
        assert sorted(layout.extend_positions.tolist()) == torch.nonzero(plan.recompute).flatten().tolist()
        assert layout.private_tokens == plan.reused_tokens  # what the client's accounting expects


def test_every_link_query_attends_exactly_the_keys_at_or_before_it():
    rng = random.Random(0)
    for _ in range(200):
        n_docs = rng.randint(1, 5)
        cuts = sorted(rng.sample(range(1, 80), 2 * n_docs))
        spans = [(cuts[2 * j], cuts[2 * j + 1]) for j in range(n_docs)]
        total = rng.choice([spans[-1][1], 80])
        cached = [(a, b - a, j) for j, (a, b) in enumerate(spans) if rng.random() < 0.8]
        layout = plan_rows(plan_spans(total, cached, rng.randint(0, 6)), rng.randint(0, spans[0][0]))
        queries = layout.extend_positions.tolist()
        for group in (None, 3):  # per-run entries; runs grouped behind shared bulk entries
            bulk, local = link_entries(layout.query_runs(), 1, group)
            for q, keys in zip(queries, visible_keys(bulk, local, queries)):
                assert sorted(keys) == list(range(q + 1))
        assert total - 1 in layout.extend_positions  # the last token always yields fresh logits


def test_generate_body_carries_the_link_hint_and_refuses_unserved_policies():
    segs = [Segment((1, 2)), Segment((5, 6, 7), document=0), Segment((9,))]
    body = client.generate_body(segs, "legolink-2", {"max_new_tokens": 4}, namespace="t")
    assert body["input_ids"] == [1, 2, 5, 6, 7, 9]
    assert decode(body["extra_key"]) == LinkHint("t", ((2, 5),), 2)
    assert "extra_key" not in client.generate_body(segs, "fr", {})
    assert [b["input_ids"] for b in client.compile_bodies(segs)] == [[5, 6, 7]]
    with pytest.raises(ValueError, match="serves fr, naive"):
        client.generate_body(segs, "cacheblend-15", {})


def test_a_client_forgets_documents_a_response_shows_evicted():
    segs = [Segment((1, 2)), Segment(tuple(range(10, 40)), document=0), Segment(tuple(range(50, 60)), document=1),
            Segment((9,))]
    known = client.CompiledDocuments()
    assert known.missing(segs) == segs[1:3]
    known.add(segs)
    assert known.missing(segs) == [] and known.missing(segs, namespace="other") == segs[1:3]
    planned = (30 - 4) + (10 - 4)
    assert known.confirm(segs, "legolink-4", cached_tokens=planned + 2)  # + the exact prefix
    assert known.confirm(segs, "fr", cached_tokens=0) and known.missing(segs) == []  # fr reuses no document
    assert not known.confirm(segs, "legolink-4", cached_tokens=planned - 6)
    assert known.missing(segs) == segs[1:3]


# ----------------------------------------------------------------- through SGLang's scheduler classes
@pytest.mark.parametrize("cascade", [False, True])
def test_linked_row_holds_every_token_at_its_prompt_position_and_documents_stay_unchanged(sglang_runtime, cascade):
    # a link this short is planned as a cascade only past a lowered threshold, in small
    # groups, its bulk keys in several entries
    tuning = CascadeTuning(auto_keys=0, group=4, chunk=5) if cascade else CascadeTuning()
    s = Scheduler()
    ids, spans, docs = prompt(random.Random(1))
    for doc in docs:
        s.compile(doc)
    nodes = s.cache.document_nodes()
    assert len(nodes) == 2
    shared = {k: [b[n.value].clone() for b in s.kv.k_buffer + s.kv.v_buffer] for k, n in nodes.items()}

    req = s.request(ids, LinkHint("ns", tuple(spans), 4))
    admitted, plan = s.prefill([req], tuning)
    assert admitted == [req]
    layout = req.epic_link.layout
    assert [r.length for r in layout.cached_runs] == [16, 13] and layout.extend_len == 6 + 4 + 3 + 4 + 9
    assert list(req.origin_input_ids_unpadded) == ids  # what SGLang detokenizes against stays the prompt
    s.assert_row_at_prompt_positions(req, ids, layer=1)
    row = s.row(req)
    assert (plan.bulk is not None) == cascade and (not cascade or plan.merge.most_parts > 1)
    for q, keys in visible_positions(plan, layout, row):
        assert sorted(keys) == list(range(q + 1))
    for k, n in s.cache.document_nodes().items():
        assert all(torch.equal(a, b[n.value]) for a, b in zip(shared[k], s.kv.k_buffer + s.kv.v_buffer))
        assert n.lock_ref > 0  # held while the request runs


def test_legolink0_links_documents_compiled_behind_sinks_at_their_prompt_positions(sglang_runtime):
    s = Scheduler()
    ids, spans, docs = prompt(random.Random(4))
    free = s.allocator.available_size()
    sinks = (7, 7, 7, 7)
    for doc in docs:
        s.compile(doc, sinks=sinks)
    assert s.allocator.available_size() == free - sum(map(len, docs))  # the sinks' KV is dropped
    plain = s.request(ids, LinkHint("ns", tuple(spans), 0))
    plain.init_next_round_input(s.cache)
    assert plain.epic_link.layout.cached_runs == ()  # sink-compiled documents are another recipe's

    req = s.request(ids, LinkHint("ns", tuple(spans), 0, sink=len(sinks)))
    admitted, _ = s.prefill([req])
    layout = req.epic_link.layout
    assert admitted == [req] and [r.length for r in layout.cached_runs] == [20, 17]
    s.assert_row_at_prompt_positions(req, ids, layer=1)  # keys compiled at t + 4, re-rotated to their place
    s.finish(req)


def test_release_publishes_the_exact_prefix_frees_everything_else_and_unlocks(sglang_runtime):
    s = Scheduler()
    ids, spans, docs = prompt(random.Random(2))
    for doc in docs:
        s.compile(doc)
    free_after_compile = s.allocator.available_size()
    req = s.request(ids, LinkHint("ns", tuple(spans), 4))
    s.prefill([req])
    s.finish(req)
    assert s.allocator.available_size() == free_after_compile - spans[0][0]  # only the prefix stays
    assert all(n.lock_ref == 0 for n in s.cache.document_nodes().values())
    slots, _ = s.cache.match_exact_prefix(ids[:spans[0][0]], "ns")
    assert len(slots) == spans[0][0]
    assert len(s.cache.match_exact_prefix(ids[:spans[0][0]], None)[0]) == 0  # under its namespace only

    again = s.request(ids, LinkHint("ns", tuple(spans), 4))
    s.prefill([again])
    assert again.epic_link.layout.exact_prefix_len == spans[0][0] and again.cache_protected_len == spans[0][0]
    assert torch.equal(s.row(again)[:spans[0][0]], slots)
    s.finish(again)
    assert s.allocator.available_size() == free_after_compile - spans[0][0]
    assert s.cache.evictable_size() == s.cache.total_size()  # nothing left locked


def test_a_document_not_cached_is_computed_in_place_and_an_evicted_one_is_matched_again(sglang_runtime):
    s = Scheduler()
    ids, spans, docs = prompt(random.Random(3))
    s.compile(docs[0])
    req = s.request(ids, LinkHint("ns", tuple(spans), 2))
    req.init_next_round_input(s.cache)
    assert [r.doc for r in req.epic_link.layout.cached_runs] == [0]
    s.cache.flush()  # the matched document is evicted before the scheduler admits the request
    admitted, plan = s.prefill([req])
    layout = req.epic_link.layout
    assert admitted == [req] and layout.cached_runs == () and layout.extend_len == len(ids)
    s.assert_row_at_prompt_positions(req, ids, layer=0)
    s.finish(req)


def test_a_document_node_split_by_a_partial_match_still_links_whole(sglang_runtime):
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from radix_ext.doc_key import doc_extra_key, document_key

    s = Scheduler()
    ids, spans, docs = prompt(random.Random(5))
    for doc in docs:
        s.compile(doc)
    key = document_key(s.cache.fingerprint, "plain", "ns", docs[0])
    s.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", docs[0][:7]), doc_extra_key(key))))
    req = s.request(ids, LinkHint("ns", tuple(spans), 4))
    s.prefill([req])
    layout = req.epic_link.layout
    assert [r.length for r in layout.cached_runs] == [16, 13]
    s.assert_row_at_prompt_positions(req, ids, layer=1)
    s.finish(req)
    assert s.cache.evictable_size() == s.cache.total_size()


def test_compiling_a_cached_document_again_keeps_one_copy(sglang_runtime):
    s = Scheduler()
    doc = list(range(50, 80))
    s.compile(doc)
    free = s.allocator.available_size()
    s.compile(doc)
    assert s.allocator.available_size() == free and len(s.cache.document_nodes()) == 1
    s.compile(doc, namespace="other")  # another tenant gets its own copy
    assert len(s.cache.document_nodes()) == 2


def test_a_link_pass_wider_than_a_prefill_chunk_falls_back_to_a_full_prefill(sglang_runtime):
    s = Scheduler(chunk=16)
    ids, spans, docs = prompt(random.Random(4))
    for doc in docs:
        s.compile(doc)
    req = s.request(ids, LinkHint("ns", tuple(spans), 4))
    s.chunk = 64
    admitted, plan = s.prefill([req])  # fits: linked
    assert plan is not None and req.epic_link is not None
    s.finish(req)
    s.chunk = 16
    req = s.request(ids, LinkHint("ns", tuple(spans), 4))
    admitted, plan = s.prefill([req])
    assert req.epic_link is None and plan is None and list(req.origin_input_ids) == ids


def test_bad_hints_and_prompt_logprobs_are_refused_with_a_message(sglang_runtime):
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    s = Scheduler()
    for hint in ['epic:{"docs": [[0, 99]], "k": 4}', "epic:not json"]:
        req = s.request(range(10), hint)
        assert isinstance(req.to_finish, FINISH_ABORT) and "epic:" in req.to_finish.message
        assert getattr(req, "epic_link", None) is None
    req = s.request(range(10), LinkHint(None, ((2, 6),), 1))
    assert isinstance(req.epic_link, LinkRequest) and req.extra_key is None
    req.return_logprob, req.logprob_start_len = True, 0  # prompt logprobs: served exactly, unlinked
    req.init_next_round_input(s.cache)
    assert req.epic_link is None and list(req.origin_input_ids) == list(range(10))
    assert isinstance(s.request(range(10), LinkHint("t", compile=True)).epic_link, CompileRequest)


def test_serve_with_the_sglang_engine_builds_sglangs_launcher_or_says_what_to_fix(capsys):
    from epic_sglang.cli import build_parser, main, sglang_server_args
    from epic_sglang.sglang_plugin.launch import server_command, server_env

    cmd = server_command("/models/m", 30001, host="0.0.0.0")
    assert cmd[1:3] == ["-m", "sglang.launch_server"] and "--radix-cache-backend" in cmd
    assert cmd[cmd.index("--attention-backend") + 1] == "flashinfer" and "--disable-prefill-cuda-graph" in cmd
    assert "--radix-cache-backend" not in server_command("/models/m", 30001, plugin=False)
    assert server_env(True, kv_dir="/kv")["EPIC_SGLANG_KV_DIR"] == "/kv" and server_env(False)["SGLANG_PLUGINS"] == "-"
    assert main(["serve", "--engine", "sglang", "--policy", "cacheblend-15"]) == 2
    assert "--policy cacheblend-15: the SGLang plugin serves fr, naive" in capsys.readouterr().err
    assert main(["serve", "--engine", "sglang", "--sglang-port", "70000"]) == 2
    assert "--sglang-port must be in 1..65535" in capsys.readouterr().err
    assert main(["serve", "--engine", "sglang", "--sglang-args", "--tp 2 --port=9"]) == 2
    assert "--sglang-args may not set --port: use --model / --sglang-port" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--engine", "sglang", "--api-key", "k",
                                      "--sglang-args", "--tp 2 --mem-fraction-static 0.8"])
    extra = sglang_server_args(args)
    assert extra[-4:] == ["--tp", "2", "--mem-fraction-static", "0.8"] and extra[extra.index("--api-key") + 1] == "k"
    if not torch.cuda.is_available():
        assert main(["serve", "--engine", "sglang"]) == 2
        assert "need a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------- on a GPU, through FlashInfer
@pytest.mark.gpu
@pytest.mark.parametrize("cascade", [False, True])
def test_link_attention_through_flashinfer_equals_the_link_mask(cascade):
    """The plan SGLang's FlashInfer backend gets for a link (per-run entries, or the cascade's
    bulk and local entries merged by log-sum-exp) attends each query to exactly the keys at
    or before its prompt position: dense masked attention in fp32, within bf16."""
    flashinfer = pytest.importorskip("flashinfer")
    # a link this short cascades only past a lowered threshold, in small groups; rows merge
    # up to 12 bulk results
    tuning = CascadeTuning(auto_keys=0, group=32, chunk=96) if cascade else CascadeTuning()
    dev, q_heads, kv_heads, dim, bf16 = torch.device("cuda"), 8, 2, 128, torch.bfloat16
    docs = [(16 + 100 * i, 16 + 100 * (i + 1)) for i in range(12)]
    n = docs[-1][1] + 24
    layout = plan_rows(plan_spans(n, [(a, b - a, j) for j, (a, b) in enumerate(docs)], 16), exact_prefix_len=16)
    g = torch.Generator(device=dev).manual_seed(0)
    slots = torch.randperm(4 * n, device=dev, generator=g)[:n]  # the request's row: row slot -> pool slot
    k, v = (torch.randn(4 * n, kv_heads, dim, device=dev, generator=g).to(bf16) for _ in range(2))
    q = torch.randn(layout.extend_len, q_heads, dim, device=dev, generator=g).to(bf16)

    # the parts of SGLang's ScheduleBatch and FlashInfer backend that planning reads
    batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(req_pool_idx=0)], extend_lens=[layout.extend_len],
                                  seq_lens_cpu=torch.tensor([n]), device=dev,
                                  req_to_token_pool=types.SimpleNamespace(req_to_token=slots[None].to(torch.int32)))
    plan = attention.build_plan(batch, {0: types.SimpleNamespace(layout=layout)}, tuning)
    assert (plan.bulk is not None) == cascade and (not cascade or plan.merge.most_parts > 1)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    backend = types.SimpleNamespace(
        num_wrappers=1, workspace_buffer=workspace,
        prefill_wrappers_paged=[flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")],
        indices_updater_prefill=types.SimpleNamespace(num_qo_heads=q_heads, num_kv_heads=kv_heads, head_dim=dim,
                                                      q_data_type=bf16, data_type=bf16))
    attention.plan_flashinfer(backend, plan)
    scale = dim ** -0.5
    out = backend.forward_metadata.prefill_wrappers[0].forward(q, (k, v), causal=True, sm_scale=scale)

    key_slots = slots[torch.from_numpy(layout.row_of()).to(dev)]  # pool slot of each prompt position
    expected = []
    for i, p in enumerate(layout.extend_positions.tolist()):
        ks, vs = (t[key_slots[:p + 1]].float().repeat_interleave(q_heads // kv_heads, dim=1) for t in (k, v))
        weights = torch.softmax(torch.einsum("hd,khd->hk", q[i].float(), ks) * scale, dim=-1)
        expected.append(torch.einsum("hk,khd->hd", weights, vs))
    torch.testing.assert_close(out.float(), torch.stack(expected), atol=2e-2, rtol=2e-2)
