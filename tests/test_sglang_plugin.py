"""The SGLang plugin on CPU with SGLang's real scheduler classes: `Req`, `PrefillAdder`,
`ScheduleBatch.prepare_for_extend`, `ReqToTokenPool`, `MHATokenToKVPool`, the token
allocator and `release_kv_cache`, patched by the plugin's real `HookRegistry` hooks.

The model forward is the one part that needs CUDA (SGLang's kernels): here a stand-in
writes each computed token's K as RoPE(position) applied to a per-token vector, which is
what a layer stores for a token at that position, and a query is the same vector rotated by
the query's position. Scoring the plan's entries with them checks every score a link gives
(which keys, at which rotation). The GPU tests run the plan through FlashInfer; the GPU
script (`benchmarks/sglang_pic.py`) runs the real forward in a real server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
import re
import time
import types
from array import array

import numpy as np
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from epic_sglang.link_plan import plan_link, plan_spans, segment_spans
from epic_sglang.policies import Segment, parse_policy
from epic_sglang.sglang_plugin import attention, client, hooks, load, tally
from epic_sglang.sglang_plugin.tally import Tally
from epic_sglang.sglang_plugin.layout import plan_rows
from epic_sglang.sglang_plugin.link_request import CompileRequest, LinkRequest
from epic_sglang.sglang_plugin.rotary import RopeTable, rotated_rows
from epic_sglang.sglang_plugin.wire import HintError, LinkHint, decode
from radix_ext import KVLayout, PICRadixCache

HEADS, DIM, LAYERS = 2, 8, 3  # CacheBlend cuts the batch past layer 1


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
    with get_parallel().override(tp_rank=0, tp_size=1):  # one scheduler, no process group
        yield
    if previous is not None:
        context.set_server_args(previous)


@pytest.fixture(params=["shared", "gathered"])
def link_attention(request, monkeypatch) -> str:
    """Both ways a link pass attends its reused documents (`attention.py`, `gathered.py`)."""
    monkeypatch.setenv("EPIC_SGLANG_LINK_ATTENTION", request.param)
    return request.param


class Scheduler:
    """One SGLang scheduler's cache state on CPU, driven the way `Scheduler` drives it."""

    def __init__(self, size: int = 1024, chunk: int | None = 4096):
        from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

        self.kv = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
                                   layer_num=LAYERS, device="cpu", enable_memory_saver=False,
                                   start_layer=0, end_layer=LAYERS)  # as SGLang's server: end one past the last
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
        self.head_dim = DIM  # what the model config says (the scout's kernels need the RoPE over all of it)
        self.chunked = None  # the request SGLang cut to fit its prefill chunk, if any
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

    def prefill(self, reqs: list) -> tuple[list, attention.LinkAttentionPlan | None]:
        """Match, admit, prepare the extend, then 'run' it: returns the admitted requests and
        the link plan the FlashInfer backend would get."""
        return self.run_extend(self.admit(reqs))

    def admit(self, reqs: list) -> list:
        """Match and admit as SGLang's `PrefillAdder` does; the requests it takes."""
        from sglang.srt.managers.schedule_policy import PrefillAdder

        adder = PrefillAdder(1, self.cache, self.allocator, None, 0.0, 8192, self.chunk)
        for req in reqs:
            req.init_next_round_input(self.cache)
            adder.add_one_req(req, has_chunked_req=False, truncation_align_size=None)
        self.chunked = adder.new_chunked_req  # a request SGLang cut to fit the chunk: `next_chunk` goes on
        return adder.can_run_list

    def extend_batch(self, admitted: list):
        """SGLang's extend batch of the admitted requests, prepared (slots allocated)."""
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        batch = ScheduleBatch.init_new(admitted, self.req_pool, self.allocator, self.cache,
                                       types.SimpleNamespace(is_encoder_decoder=False, vocab_size=1 << 16),
                                       False, SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        return batch

    def run_extend(self, admitted: list) -> tuple[list, attention.LinkAttentionPlan | None]:
        if not admitted:
            return [], None
        self.batch = self.extend_batch(admitted)
        plan = self.forward(self.batch)
        if self.chunked is not None:  # the scheduler stashes a cut request's chunk (`stash_chunked_request`)
            self.cache.cache_unfinished_req(self.chunked, chunked=True)
        return admitted, plan

    def next_chunk(self) -> None:
        """The next round's chunk of the request SGLang cut (`Scheduler.get_new_batch_prefill`)."""
        from sglang.srt.managers.schedule_policy import PrefillAdder

        req = self.chunked
        adder = PrefillAdder(1, self.cache, self.allocator, None, 0.0, 8192, self.chunk)
        req.init_next_round_input()
        self.chunked = adder.add_chunked_req(req)
        self.run_extend([req])

    def forward(self, batch, decode: bool = False) -> attention.LinkAttentionPlan | None:
        """What the ForwardBatch.init_new hook plans (and querylink's scout, before the first
        layer), then the layers' KV writes."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        mode = ForwardMode.DECODE if decode else ForwardMode.MIXED if batch.forward_mode == ForwardMode.MIXED \
            else ForwardMode.EXTEND
        ids = torch.tensor([t for i, req in enumerate(batch.reqs) for t in self.computed_tokens(batch, i, decode)])
        fb = types.SimpleNamespace(forward_mode=mode, positions=torch.zeros(len(ids), dtype=torch.int64),
                                   out_cache_loc=batch.out_cache_loc.clone(), input_ids=ids)
        runner = types.SimpleNamespace(epic_rope=self.rope, epic_layers_hooked=True, model=self.model,
                                       model_config=types.SimpleNamespace(head_dim=self.head_dim))
        plan = getattr(hooks.link_forward_batch(fb, None, batch, runner), "epic_plan", None)
        if plan is not None and plan.scouts:
            self.scout(plan, fb)
        offset = 0
        for i, req in enumerate(batch.reqs):
            n = 1 if decode else batch.extend_lens[i]
            seq_len = int(batch.seq_lens_cpu[i])
            positions = plan.positions.get(offset) if plan else None
            positions = positions.tolist() if positions is not None else list(range(seq_len - n, seq_len))
            tokens = self.computed_tokens(batch, i, decode)
            slots = batch.out_cache_loc[offset:offset + n]
            for layer in range(LAYERS):
                self.kv.k_buffer[layer][slots] = torch.stack([self.key(t, p) for t, p in zip(tokens, positions)])
                self.kv.v_buffer[layer][slots] = torch.stack([self.base(t) for t in tokens])
            offset += n
        return plan

    @staticmethod
    def computed_tokens(batch, i: int, decode: bool) -> list[int]:
        """The tokens the forward computes for the batch's request i: its row's last ones."""
        req, seq_len = batch.reqs[i], int(batch.seq_lens_cpu[i])
        n = 1 if decode else batch.extend_lens[i]
        return (list(req.origin_input_ids) + list(req.output_ids))[seq_len - n:seq_len]

    # ------------------------------------------------------------- querylink's scout
    @property
    def model(self):
        """Stand-in decoder layers and embedding (a row's token id rides in its hidden state)."""
        layers = [types.SimpleNamespace(layer_id=i, self_attn=types.SimpleNamespace(attn=types.SimpleNamespace(layer_id=i)))
                  for i in range(LAYERS)]
        return types.SimpleNamespace(model=types.SimpleNamespace(layers=layers, embed_tokens=lambda t: t[:, None].float()))

    def layer_forward(self, layer, positions, h, forward_batch, r):
        """What a layer stores for each row's token at its position, and its attention through
        the backend's wrapper while the scout runs (what it returns is the scout's concern)."""
        tokens, pos = h[:, 0].long().tolist(), positions.tolist()
        self.layer_calls.append((layer.layer_id, pos))
        slots = forward_batch.out_cache_loc
        self.kv.k_buffer[layer.layer_id][slots] = torch.stack([self.key(t, p) for t, p in zip(tokens, pos)])
        self.kv.v_buffer[layer.layer_id][slots] = torch.stack([self.base(t) for t in tokens])
        metadata = self.backend.forward_metadata
        wrapper = metadata.prefill_wrappers[0] if metadata is not None else None
        if wrapper is not None:
            assert wrapper.layer == layer.layer_id
            wrapper.forward(torch.stack([self.key(t, p) for t, p in zip(tokens, pos)]),
                            (self.kv.k_buffer[layer.layer_id], self.kv.v_buffer[layer.layer_id]), causal=True,
                            sm_scale=DIM ** -0.5)
        return h, r

    def scout(self, plan: attention.LinkAttentionPlan, fb) -> None:
        """The decoder-layer hook's first call in a forward with querylink link passes: the
        scouts, the picks, the rows planned again (FlashInfer's planning left out: the plan is
        kept in `self.replanned`), then the first layer over the new rows."""
        from unittest import mock

        self.backend, self.layer_calls = types.SimpleNamespace(forward_metadata=None), []
        context = "sglang.srt.model_executor.forward_context"
        with mock.patch(f"{context}.get_attn_backend", lambda: self.backend), \
                mock.patch(f"{context}.get_token_to_kv_pool", lambda: self.kv), \
                mock.patch.object(attention, "plan_flashinfer", lambda backend, plan_: setattr(self, "replanned", plan_)):
            self.embedded = hooks.link_layer(self.layer_forward, plan.model.model.layers[0], fb.positions,
                                             fb.input_ids[:, None].float(), fb, None)[0]
        self.scout_batch = fb

    def decode_step(self, token: int = 3) -> attention.LinkAttentionPlan | None:
        """Every request of the last batch samples `token`; SGLang's decode step's set-up, then
        the forward."""
        self.sample(token)
        return self.forward(self.batch, decode=True)

    def sample(self, token: int) -> None:
        """Every request of the last batch samples `token`, and the batch is set up to decode it."""
        for req in self.batch.reqs:
            req.output_ids.append(token)
        self.batch.output_ids = torch.tensor([token] * len(self.batch.reqs))
        self.batch.prepare_for_decode()

    def mixed_step(self, reqs: list, token: int = 3) -> tuple[list, attention.LinkAttentionPlan | None]:
        """SGLang's mixed chunk (`--enable-mixed-chunk`): new requests' extends and the last
        batch's decode step in one forward (`ScheduleBatch.mix_with_running`, new rows first)."""
        admitted = self.admit(reqs)
        new = self.extend_batch(admitted)
        self.sample(token)
        new.mix_with_running(self.batch)
        self.batch = new
        return admitted, self.forward(new)

    def finish(self, req) -> None:
        from sglang.srt.mem_cache.common import release_kv_cache

        if not req.output_ids:
            req.output_ids.append(3)
        release_kv_cache(req, self.cache)

    def compile(self, doc: list[int], namespace: str | None = "ns", sinks: tuple[int, ...] = ()) -> None:
        """A document compiled as SGLang runs it: in chunks when it is longer than the chunk."""
        req = self.request([*sinks, *doc], LinkHint(namespace, compile=True, sink=len(sinks)), max_new_tokens=0)
        assert self.prefill([req])[0] == [req]
        while self.chunked is req:
            self.next_chunk()
        self.finish(req)

    def compiled_prompt(self, seed: int) -> tuple[list[int], list[tuple[int, int]], list[list[int]]]:
        """`prompt` with its documents compiled."""
        ids, spans, docs = prompt(random.Random(seed))
        for doc in docs:
            self.compile(doc)
        return ids, spans, docs

    def row(self, req) -> torch.Tensor:
        return self.req_pool.req_to_token[req.req_pool_idx, :len(req.full_untruncated_fill_ids)]

    def assert_row_at_prompt_positions(self, req, ids: list[int], layer: int) -> None:
        """Every slot of the request's row holds its token's K at its prompt position (the
        private tokens: the row holds no reused document token)."""
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


def link_scores(s: Scheduler, plan, req, ids: list[int], batch_row: int = 0) -> list[tuple[int, dict[int, float]]]:
    """(query position, {key position: score}) for every query of `req` (the batch's query
    rows from `batch_row` on) as the plan scores it: its causal entry over the row (bottom-right
    aligned; in decode SGLang's own, over the whole row) and the shared parts' rotated queries
    over the documents' slots, or the gathered pass's entries over its scratch. A query is its
    token's vector rotated by its position."""
    if plan.gathered is not None:
        return gathered_scores(s, plan, ids + list(req.output_ids), batch_row)
    link, layout = req.epic_link, req.epic_link.layout
    seq = ids + list(req.output_ids)
    positions = plan.positions[batch_row].tolist()
    q = torch.stack([s.key(seq[p], p) for p in positions])
    keys = s.kv.k_buffer[0]
    generated_since_link = len(seq) - layout.prompt_len  # a retracted request relinks its earlier output
    row_positions = np.concatenate([layout.order, layout.prompt_len + np.arange(generated_since_link)])
    row = s.req_pool.req_to_token[req.req_pool_idx, :positions[-1] + 1 - layout.reused_tokens]
    scores = [{} for _ in positions]
    for j in range(len(positions)):  # the row: causal, its last len(positions) slots the queries'
        for slot, pos in zip(row[:len(row) - len(positions) + j + 1].tolist(), row_positions.tolist()):
            scores[j][pos] = float((q[j] * keys[slot]).sum())
    if plan.local is not None:  # the plan's local entry is that row
        qo, kv = plan.local.qo_indptr.tolist(), plan.local.kv_indptr.tolist()
        e = qo.index(batch_row)
        assert qo[e + 1] - qo[e] == len(positions) and torch.equal(plan.local.kv_indices[kv[e]:kv[e + 1]], row.int())
    if plan.shared is not None:
        position_of = {}
        for r, slots in zip(layout.cached_runs, link.shared.slots.split(link.shared.lengths)):
            position_of.update(zip(slots.tolist(), range(r.start, r.start + r.length)))
        rows = plan.shared.merge.query_rows
        batch_q = torch.zeros(int(rows.max()) + 1, *q.shape[1:])
        batch_q[batch_row:batch_row + len(positions)] = q
        rotated = rotated_rows(s.rope, batch_q, rows, plan.shared.cos_sin)
        qo, kv = plan.shared.entries.qo_indptr.tolist(), plan.shared.entries.kv_indptr.tolist()
        for e in range(len(qo) - 1):
            slots = plan.shared.entries.kv_indices[kv[e]:kv[e + 1]].tolist()
            for g in range(qo[e], qo[e + 1]):
                j = int(rows[g]) - batch_row
                if 0 <= j < len(positions):
                    for slot in slots:
                        assert position_of[slot] not in scores[j], "a key attended twice"
                        scores[j][position_of[slot]] = float((rotated[g] * keys[slot]).sum())
    return list(zip(positions, scores))


def gathered_scores(s: Scheduler, plan, seq: list[int], batch_row: int) -> list[tuple[int, dict[int, float]]]:
    """`link_scores` of a gathered pass (`gathered.py`): its keys gathered (layer 0) into the
    scratch as the forward gathers them, then every entry read as FlashInfer reads it (pages of
    the scratch; local entries causal, bottom-right aligned; or the masked tiles: a group's
    local keys up to each query's position), the bulk entries' rows being the merge's."""
    from epic_sglang.link_plan import GATHER_PAGE
    from epic_sglang.sglang_plugin.rotary import rotated_copy

    g = plan.gathered
    positions = plan.positions[batch_row].tolist()
    q = torch.stack([s.key(seq[p], p) for p in positions])
    k_scratch = torch.zeros(g.scratch_rows, HEADS, DIM)
    rotated_copy(s.rope, [s.kv.k_buffer[0]], [s.kv.v_buffer[0]], g.slots, g.rows, g.cos_sin,
                 [k_scratch], [torch.zeros_like(k_scratch)])
    first_row = g.first_rows[[m.offset for m in plan.linked].index(batch_row)]
    assert g.positions.tolist()[batch_row:batch_row + len(positions)] == positions
    read = [[] for _ in positions]  # the scratch rows each query reads

    def read_entries(entries, causal: bool, batch_rows: list[int]) -> None:
        """`batch_rows`: the batch row of each query the wrapper is given."""
        qo, kv, last = entries.qo_indptr.tolist(), entries.kv_indptr.tolist(), entries.last_page_len.tolist()
        assert qo[-1] == len(batch_rows)
        for e in range(len(qo) - 1):
            pages = entries.kv_indices[kv[e]:kv[e + 1]].tolist()
            assert pages == list(range(pages[0], pages[0] + len(pages)))  # a range of the scratch
            rows = list(range(pages[0] * GATHER_PAGE, (pages[0] + len(pages) - 1) * GATHER_PAGE + last[e]))
            n = qo[e + 1] - qo[e]
            for i in range(n):
                j = batch_rows[qo[e] + i] - batch_row
                if 0 <= j < len(positions):
                    read[j] += rows[:len(rows) - n + i + 1] if causal else rows

    if g.masked_local:
        for q0, q1, key_row, key_pos in g.groups:
            for r in range(max(q0, batch_row), min(q1, batch_row + len(positions))):
                read[r - batch_row] += list(range(key_row, key_row + positions[r - batch_row] - key_pos + 1))
    else:
        read_entries(g.local, True, list(range(len(g.positions))))  # every batch row, in order
    if g.bulk is not None:
        read_entries(g.bulk, False, g.merge.query_rows.tolist())  # the rows the merge gathers
    scores = []
    for j, rows in enumerate(read):
        got = {}
        for r in rows:
            assert r - first_row not in got, "a key attended twice"
            got[r - first_row] = float((q[j] * k_scratch[r]).sum())
        scores.append(got)
    return list(zip(positions, scores))


def assert_link_scores(s: Scheduler, plan, req, ids: list[int], batch_row: int = 0) -> None:
    """Every query scores exactly the tokens at or before it, each at its prompt position."""
    seq = ids + list(req.output_ids)
    for p, got in link_scores(s, plan, req, ids, batch_row):
        assert sorted(got) == list(range(p + 1))
        q = s.key(seq[p], p)
        for k, score in got.items():
            assert abs(score - float((q * s.key(seq[k], k)).sum())) < 1e-4, (p, k)


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
    assert decode(LinkHint("t", ((3, 9),), blend=15.0).encode()) == LinkHint("t", ((3, 9),), blend=15.0)
    for bad in [LinkHint("t", ((3, 9),), blend=101.0), LinkHint("t", ((3, 9),), blend=-1.0),
                LinkHint("t", ((3, 9),), 4, blend=15.0)]:
        with pytest.raises(HintError, match="epic: blend must be a percent"):
            bad.validate(20)
    query = LinkHint("t", ((3, 9),), 8, query_k=16, block=4, stride=2)
    shared = LinkHint("t", ((3, 9),), 8, query_share=12.5, block=4)
    assert decode(query.encode()) == query and decode(shared.encode()) == shared and shared.querylink
    for bad in [LinkHint("t", ((3, 9),), 8, query_k=4), LinkHint("t", ((3, 9),), 8, query_k=16, block=0),
                LinkHint("t", ((3, 9),), 8, query_k=16, stride=0), LinkHint("t", ((3, 9),), 8, query_k=16, sink=4),
                LinkHint("t", ((3, 9),), 8, query_share=101.0), LinkHint("t", ((3, 9),), 8, query_share=-3.0),
                LinkHint("t", ((3, 9),), 8, query_k=16, query_share=10.0)]:
        with pytest.raises(HintError, match="epic: querylink needs q"):
            bad.validate(20)
    for q in ["[16]", "[0, 1, 1, 10, 2]"]:
        with pytest.raises(HintError, match=re.escape("epic: q must be [k, block, stride] or [0, block, stride, percent]")):
            decode(f'epic:{{"docs": [[3, 9]], "q": {q}}}')


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
        assert layout.reused_tokens == plan.reused_tokens  # what the client's accounting expects


def test_every_link_query_attends_exactly_the_keys_at_or_before_it():
    """The row (private tokens, causal in prompt order) and each cached run from its first
    query on cover every key at or before each query, once."""
    rng = random.Random(0)
    for _ in range(300):
        n_docs = rng.randint(1, 5)
        cuts = sorted(rng.sample(range(1, 80), 2 * n_docs))
        spans = [(cuts[2 * j], cuts[2 * j + 1]) for j in range(n_docs)]
        total = rng.choice([spans[-1][1], 80])
        cached = [(a, b - a, j) for j, (a, b) in enumerate(spans) if rng.random() < 0.8]
        layout = plan_rows(plan_spans(total, cached, rng.randint(0, 6)), rng.randint(0, spans[0][0]))
        private = layout.order.tolist()
        assert sorted(private + [p for r in layout.cached_runs for p in range(r.start, r.start + r.length)]) \
            == list(range(total))
        starts = layout.run_query_starts()
        for i, q in enumerate(layout.extend_positions.tolist()):
            keys = [p for p in private if p <= q]
            for r, first in zip(layout.cached_runs, starts):
                keys += list(range(r.start, r.start + r.length)) if i >= first else []
            assert sorted(keys) == list(range(q + 1))
        assert total - 1 in layout.extend_positions  # the last token always yields fresh logits


def test_generate_body_carries_every_policys_link_hint():
    segs = [Segment((1, 2)), Segment((5, 6, 7), document=0), Segment((9,))]
    body = client.generate_body(segs, "legolink-2", {"max_new_tokens": 4}, namespace="t")
    assert body["input_ids"] == [1, 2, 5, 6, 7, 9]
    assert decode(body["extra_key"]) == LinkHint("t", ((2, 5),), 2)
    assert "extra_key" not in client.generate_body(segs, "fr", {})
    assert [b["input_ids"] for b in client.compile_bodies(segs)] == [[5, 6, 7]]
    assert decode(client.generate_body(segs, "cacheblend-15", {}, namespace="t")["extra_key"]) == LinkHint("t", ((2, 5),), blend=15.0)
    assert decode(client.generate_body(segs, "querylink-16-h2-b4-s2", {}, namespace="t")["extra_key"]) == LinkHint(
        "t", ((2, 5),), 2, query_k=16, block=4, stride=2)
    assert decode(client.generate_body(segs, "querylink-p12.5-b2", {}, namespace="t")["extra_key"]) == LinkHint(
        "t", ((2, 5),), 8, query_share=12.5, block=2)
    with pytest.raises(ValueError, match="unknown policy"):
        client.generate_body(segs, "prophet-16", {})


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
def test_linked_row_holds_only_private_tokens_and_documents_are_read_in_place_unchanged(sglang_runtime, link_attention):
    s = Scheduler()
    ids, spans, docs = s.compiled_prompt(1)
    nodes = s.cache.document_nodes()
    assert len(nodes) == 2
    shared = {k: [b[n.value].clone() for b in s.kv.k_buffer + s.kv.v_buffer] for k, n in nodes.items()}
    free = s.allocator.available_size()

    req = s.request(ids, LinkHint("ns", tuple(spans), 4))
    admitted, plan = s.prefill([req])
    assert admitted == [req]
    layout = req.epic_link.layout
    assert [r.length for r in layout.cached_runs] == [16, 13] and layout.extend_len == 6 + 4 + 3 + 4 + 9
    assert free - s.allocator.available_size() == layout.extend_len  # private KV: the computed tokens only
    assert list(req.origin_input_ids_unpadded) == ids  # what SGLang detokenizes against stays the prompt
    assert req.cached_tokens == 29  # SGLang reports the reused document tokens as cached
    s.assert_row_at_prompt_positions(req, ids, layer=1)
    assert (plan.gathered is not None, plan.shared is None) == (link_attention == "gathered",) * 2
    assert_link_scores(s, plan, req, ids)
    for _ in range(3):  # decode: the new token attends the prompt and what came before it, at their positions
        assert_link_scores(s, s.decode_step(), req, ids)
    assert free - s.allocator.available_size() == layout.extend_len + 3  # + the generated tokens
    for k, n in s.cache.document_nodes().items():
        assert all(torch.equal(a, b[n.value]) for a, b in zip(shared[k], s.kv.k_buffer + s.kv.v_buffer))
        assert n.lock_ref > 0  # held while the request runs
    s.finish(req)
    assert all(n.lock_ref == 0 for n in s.cache.document_nodes().values())


def test_a_batch_of_linked_and_plain_requests_scores_each_request_on_its_own_documents(sglang_runtime, link_attention):
    s = Scheduler()
    first, second = (prompt(random.Random(seed)) for seed in (6, 7))
    for _, _, docs in (first, second):
        for doc in docs:
            s.compile(doc)
    plain = list(range(2000, 2012))
    reqs = [s.request(first[0], LinkHint("ns", tuple(first[1]), 2)), s.request(plain),
            s.request(second[0], LinkHint("ns", tuple(second[1]), 5))]
    admitted, plan = s.prefill(reqs)
    assert admitted == reqs
    assert plan.gathered is None  # a plain request in the pass's batch: the shared path
    starts = np.cumsum([0] + s.batch.extend_lens)
    assert_link_scores(s, plan, reqs[0], first[0], int(starts[0]))
    assert_link_scores(s, plan, reqs[2], second[0], int(starts[2]))
    assert int(starts[1]) not in plan.positions  # the plain request keeps SGLang's positions
    step = s.decode_step()
    assert_link_scores(s, step, reqs[0], first[0], 0)
    assert_link_scores(s, step, reqs[2], second[0], 2)
    for req in reqs:
        s.finish(req)


def test_many_random_linked_batches_score_exactly_and_never_write_a_document(sglang_runtime, link_attention):
    """Property: random batches of linked requests (documents in any order and subset, random
    k, querylink among them, prefixes that sometimes hit the exact-prefix tree, plain requests mixed in), each link
    pass and two decode steps scored exactly; afterwards every document's KV is bit for bit
    what its compile wrote and nothing is left locked."""
    rng = random.Random(11)
    s = Scheduler(size=4096)
    docs = [list(range(3000 + 100 * j, 3000 + 100 * j + rng.randint(4, 24))) for j in range(6)]
    for doc in docs:
        s.compile(doc)
    shared = {k: [b[n.value].clone() for b in s.kv.k_buffer + s.kv.v_buffer] for k, n in s.cache.document_nodes().items()}
    heads = [[rng.randint(100, 199) for _ in range(rng.randint(0, 5))] for _ in range(3)]

    def linked() -> tuple[list[int], LinkHint]:
        ids, spans = list(rng.choice(heads)), []
        for j in rng.sample(range(len(docs)), rng.randint(1, 4)):
            ids += [rng.randint(200, 299) for _ in range(rng.randint(0, 2))]
            spans.append((len(ids), len(ids) + len(docs[j])))
            ids += docs[j]
        ids += [rng.randint(300, 399) for _ in range(rng.randint(1, 6))]
        k = rng.randint(0, 6)
        query_k = k + rng.randint(1, 10) if rng.random() < 0.3 else 0  # querylink: its scout picks the rest
        share = rng.choice([10.0, 40.0]) if not query_k and rng.random() < 0.15 else 0.0  # querylink-p
        return ids, LinkHint("ns", tuple(spans), k, query_k=query_k, query_share=share)

    read_together = 0  # steps where requests that link one run attend it in one entry
    for _ in range(25):
        prompts = [linked() for _ in range(rng.randint(1, 3))]
        reqs = [s.request(ids, hint) for ids, hint in prompts]
        if rng.random() < 0.5:
            reqs.insert(rng.randint(0, len(reqs)), s.request([rng.randint(400, 499) for _ in range(5)]))
        admitted, plan = s.prefill(reqs)
        assert admitted == reqs
        starts = np.cumsum([0] + s.batch.extend_lens)
        linked_rows = [(i, req) for i, req in enumerate(reqs) if getattr(req, "epic_link", None) is not None]
        for i, req in linked_rows:
            assert_link_scores(s, plan, req, list(req.epic_link.prompt), int(starts[i]))
        for token in (5, 6):
            step = s.decode_step(token)
            for i, req in linked_rows:
                assert_link_scores(s, step, req, list(req.epic_link.prompt), i)
            if step is not None and step.shared is not None:
                read_together += len(step.shared.entries.qo_indptr) - 1 < len(step.shared.spans)
        for req in reqs:
            s.finish(req)
    assert read_together > 0
    for k, n in s.cache.document_nodes().items():
        assert all(torch.equal(a, b[n.value]) for a, b in zip(shared[k], s.kv.k_buffer + s.kv.v_buffer))
    assert s.cache.evictable_size() == s.cache.total_size()  # nothing left locked


def test_a_gathered_pass_of_scattered_picks_attends_masked_tiles_and_of_few_runs_causal_entries(sglang_runtime):
    """A gathered link pass (`gathered.py`) whose groups hold more query runs than
    `CascadeTuning.masked_runs` (querylink's scattered picks) attends each group's local keys as
    position-masked tiles; one of few runs, causal entries a run; the bulk entries over the keys
    before each group either way. Every query scores exactly the keys at or before it, each at
    its prompt position (documents' keys read from where they were compiled, rotated by their shift)."""
    from epic_sglang.sglang_plugin.gathered import plan_pass
    from epic_sglang.sglang_plugin.link_request import SharedRuns

    s, rng = Scheduler(size=4096), random.Random(5)
    docs, total = [(24, 200), (210, 390)], 420
    ids = [rng.randint(1000, 9000) for _ in range(total)]
    slot_of = torch.randperm(4000, generator=torch.Generator().manual_seed(5))[:total]  # each position's pool slot
    for every, masked in ((3, True), (40, False)):  # a pick every 3rd document token, or every 40th
        lp = plan_spans(total, [(a, b - a, j) for j, (a, b) in enumerate(docs)], 2)
        for a, b in docs:
            lp.recompute[a + 2:b:every] = True
        layout = plan_rows(lp, exact_prefix_len=20)  # the first group's bulk: the exact prefix's first page
        runs = layout.cached_runs
        for p in layout.order.tolist():  # private tokens: stored at their prompt positions
            s.kv.k_buffer[0][slot_of[p]] = s.key(ids[p], p)
        for r in runs:  # reused ones: where their document was compiled
            for p in range(r.start, r.start + r.length):
                s.kv.k_buffer[0][slot_of[p]] = s.key(ids[p], p - r.start + r.offset)
        shared = SharedRuns(torch.cat([slot_of[r.start:r.start + r.length] for r in runs]).int(), [r.length for r in runs],
                            torch.tensor([r.start - r.offset for r in runs]), [(r.doc, r.offset, r.length) for r in runs],
                            [r.doc for r in runs])
        row = slot_of[torch.from_numpy(layout.order)]
        linked = [attention.LinkedRows(types.SimpleNamespace(layout=layout, shared=shared), 0, layout.extend_len,
                                       len(layout.order), True, 0)]
        g = plan_pass(linked, row[None], s.rope, torch.device("cpu"))
        assert g.masked_local == masked and (g.local is None) == masked and g.bulk is not None
        plan = types.SimpleNamespace(gathered=g, linked=linked, positions={0: torch.from_numpy(layout.extend_positions)})
        for p, got in gathered_scores(s, plan, ids, 0):
            assert sorted(got) == list(range(p + 1))
            q = s.key(ids[p], p)
            for k, score in got.items():
                assert abs(score - float((q * s.key(ids[k], k)).sum())) < 1e-4, (p, k)


def test_link_passes_past_the_scratch_bound_keep_the_shared_path(sglang_runtime, monkeypatch):
    """A prefill batch of link passes reading more keys than `MAX_GATHERED_KEYS` together (its
    scratch would hold them all) attends through the shared path; one within it, gathered."""
    from epic_sglang.sglang_plugin import gathered

    monkeypatch.setenv("EPIC_SGLANG_LINK_ATTENTION", "gathered")
    s = Scheduler()
    first, second = s.compiled_prompt(21), s.compiled_prompt(22)
    reqs = [s.request(first[0], LinkHint("ns", tuple(first[1]), 2)), s.request(second[0], LinkHint("ns", tuple(second[1]), 3))]
    keys = len(first[0]) + len(second[0])  # each pass reads its whole prompt (its last token is computed)
    monkeypatch.setattr(gathered, "MAX_GATHERED_KEYS", keys - 1)
    admitted, plan = s.prefill(reqs)
    assert admitted == reqs and plan.gathered is None and plan.shared is not None
    starts = np.cumsum([0] + s.batch.extend_lens)
    for i, (ids, _, _) in enumerate((first, second)):
        assert_link_scores(s, plan, reqs[i], ids, int(starts[i]))
    for req in reqs:
        s.finish(req)
    monkeypatch.setattr(gathered, "MAX_GATHERED_KEYS", keys)
    reqs = [s.request(first[0], LinkHint("ns", tuple(first[1]), 2)), s.request(second[0], LinkHint("ns", tuple(second[1]), 3))]
    admitted, plan = s.prefill(reqs)
    assert plan.gathered is not None and plan.gathered.scratch_rows >= keys
    starts = np.cumsum([0] + s.batch.extend_lens)  # the heads are exact prefixes now
    for i, (ids, _, _) in enumerate((first, second)):
        assert_link_scores(s, plan, reqs[i], ids, int(starts[i]))
    for req in reqs:
        s.finish(req)


def test_our_triton_attention_refuses_a_layer_scaled_or_capped_otherwise(sglang_runtime):
    """The scout and the gathered pass's tiles scale by head_dim ** -0.5 and cap nothing: a
    layer SGLang runs otherwise is refused by name, not attended wrongly."""
    from epic_sglang.sglang_plugin.scout import ScoutWrapper

    q, kv = torch.zeros(2, HEADS, DIM), (torch.zeros(4, HEADS, DIM), torch.zeros(4, HEADS, DIM))
    assert ScoutWrapper([]).forward(q, kv, causal=True, sm_scale=DIM ** -0.5).shape == q.shape
    for bad in ({"sm_scale": 1.0}, {"sm_scale": DIM ** -0.5, "logits_soft_cap": 30.0}):
        with pytest.raises(NotImplementedError, match="querylink's scout needs attention scaled by head_dim"):
            ScoutWrapper([]).forward(q, kv, causal=True, **bad)


def test_link_attention_mode_is_checked_when_the_plugin_loads(monkeypatch):
    from epic_sglang.sglang_plugin import gathered

    monkeypatch.setenv("EPIC_SGLANG_LINK_ATTENTION", "gatherd")
    with pytest.raises(ValueError, match="EPIC_SGLANG_LINK_ATTENTION must be one of"):
        hooks.install()
    monkeypatch.delenv("EPIC_SGLANG_LINK_ATTENTION")
    assert gathered.link_attention_mode() == "shared"  # the default until measured on a GPU


def test_decode_graph_padding_holds_every_shared_entry_once_and_merges_padding_nowhere(sglang_runtime, monkeypatch):
    from epic_sglang.sglang_plugin import decode_graphs

    s = Scheduler()
    first, second = s.compiled_prompt(9), s.compiled_prompt(10)
    reqs = [s.request(first[0], LinkHint("ns", tuple(first[1]), 2)), s.request(list(range(2000, 2012))),
            s.request(second[0], LinkHint("ns", tuple(second[1]), 5))]
    s.prefill(reqs)
    plan = s.decode_step()
    parts, bs = plan.shared, 4  # SGLang pads 3 requests to its captured batch size 4
    tier = decode_graphs.graph_parts(plan, plan.batch_size)
    assert plan.batch_size == 3 and tier == min(decode_graphs.PART_TIERS)  # the smallest graph that holds it
    entries = decode_graphs.graph_slots(bs, tier)
    padded = decode_graphs.PaddedEntries.of(parts, bs, tier)
    assert padded.real == len(parts.spans) == 4 and decode_graphs.fits(plan, bs, tier)
    used = len(parts.entries.qo_indptr) - 1
    # entry 0 the spare one (no query, no key: FlashInfer's spare blocks run it), then the step's
    assert padded.qo_indptr[:2].tolist() == [0, 0] and padded.kv_indptr[:2].tolist() == [0, 0]
    assert padded.qo_indptr[1:used + 2].tolist() == parts.entries.qo_indptr.tolist()
    rows = decode_graphs.graph_rows(bs, tier)
    assert (padded.qo_indptr[used + 1:-1] == padded.real).all() and padded.qo_indptr[-1] == rows  # the last: the rest
    lens = np.diff(padded.kv_indptr)
    assert lens[1:used + 1].tolist() == np.diff(parts.entries.kv_indptr.tolist()).tolist()
    assert (lens[used + 1:] == 1).all()
    assert len(padded.kv_indptr) == len(padded.qo_indptr) == entries + 1
    assert len(padded.query_rows) == len(padded.part_idx) == rows == entries - 2 + bs
    # each batch row merges exactly its own runs' parts, in the order the eager merge takes them
    merged = {r: padded.part_idx[padded.part_ptr[r]:padded.part_ptr[r + 1]].tolist() for r in range(bs)}
    merge_rows = parts.merge.rows.tolist()
    ptr, idx = parts.merge.part_ptr.tolist(), parts.merge.part_idx.tolist()
    assert merged == {r: idx[ptr[merge_rows.index(r)]:ptr[merge_rows.index(r) + 1]] if r in merge_rows else []
                      for r in range(bs)}
    assert all(padded.query_rows[e] == r for r, es in merged.items() for e in es)
    assert sorted(e for es in merged.values() for e in es) == list(range(padded.real))  # padding merges nowhere
    capture = decode_graphs.PaddedEntries.for_capture(bs, tier)  # the most rows, so FlashInfer's bound holds
    assert capture.qo_indptr[-1] == rows and capture.qo_indptr[1:3].tolist() == [0, bs]
    assert capture.part_ptr.tolist() == [0] * (bs + 1)
    assert decode_graphs.graph_parts(plan, 0) is None and not decode_graphs.runs_in_graph(plan, 0)  # no room: eager
    # a request reading more documents than the small tier holds, or more parts than its graph
    # of this batch size has entries, takes the next tier; past the largest, eager
    small, large = decode_graphs.PART_TIERS[0], decode_graphs.PART_TIERS[-1]

    def step(most_parts: int, spans: int) -> attention.LinkAttentionPlan:
        shared = dataclasses.replace(parts, merge=dataclasses.replace(parts.merge, most_parts=most_parts),
                                     spans=[(0, 1)] * spans)
        return dataclasses.replace(plan, shared=shared)

    assert decode_graphs.graph_parts(step(small, 3 * small), 3) == small
    assert decode_graphs.graph_parts(step(small + 1, 4), 3) == large
    assert decode_graphs.graph_parts(step(small, 3 * small + 1), 3) == large
    assert decode_graphs.graph_parts(step(large + 1, 4), 3) is None and not decode_graphs.runs_in_graph(step(large + 1, 4), 3)
    assert decode_graphs.graph_parts(step(1, decode_graphs.MAX_ENTRIES + 1), 128) is None
    assert decode_graphs.graph_slots(bs, small) < decode_graphs.graph_slots(bs, large)
    assert decode_graphs.runs_in_graph(plan, bs) and not decode_graphs.runs_in_graph(plan, bs, lora_variants=True)
    positions_only = dataclasses.replace(plan, shared=None)  # documents all computed: SGLang's own graph
    assert decode_graphs.runs_in_graph(None, 1) and decode_graphs.runs_in_graph(positions_only, 1, lora_variants=True)
    monkeypatch.setenv("EPIC_SGLANG_DECODE_GRAPHS", "0")  # no `epic` graphs captured
    assert not decode_graphs.runs_in_graph(plan, bs) and decode_graphs.runs_in_graph(positions_only, bs)
    for req in reqs:
        s.finish(req)


def test_each_batch_size_captures_one_linked_graph_per_tier_and_a_step_replays_the_smallest_it_fits(
        sglang_runtime, monkeypatch, caplog):
    """The decode graph hooks: SGLang's own graph of a size, then one `epic` graph per tier
    (labelled by it, the tier set on the backend while it is captured); a step over shared
    documents resolves to the smallest tier that holds it, a plain step keeps SGLang's label,
    no `epic` graph is captured beside SGLang's LoRA variants, and linked steps that run eagerly are
    counted in the log's tally. (Replaying the graphs needs
    CUDA: `test_link_attention_through_flashinfer_scores_shared_documents_in_place_at_their_prompt_positions`
    captures every tier.)"""
    from epic_sglang.sglang_plugin import decode_graphs

    runner = types.SimpleNamespace(attn_backend=types.SimpleNamespace(epic_capturing=None))
    captures = []

    def capture_one_shape(runner, size, forward, stream_idx, variant_label):
        captures.append((size, variant_label, runner.attn_backend.epic_capturing))

    hooks.capture_link_variant(capture_one_shape, runner, 8, None)
    assert captures == [(8, None, None)] + [(8, f"epic{t}", t) for t in decode_graphs.PART_TIERS]
    assert runner.attn_backend.epic_capturing is None
    captures.clear()
    runner.record_nolora_graph = True  # SGLang's LoRA variants: linked steps run eagerly
    hooks.capture_link_variant(capture_one_shape, runner, 8, None, variant_label="nolora")
    assert captures == [(8, "nolora", None)]

    s = Scheduler()
    prompt = s.compiled_prompt(9)
    reqs = [s.request(prompt[0], LinkHint("ns", tuple(prompt[1]), 2))]
    s.prefill(reqs)
    plan = s.decode_step()
    def reading(parts: int) -> attention.LinkAttentionPlan:  # the step, its request reading `parts` documents
        return dataclasses.replace(plan, shared=dataclasses.replace(
            plan.shared, merge=dataclasses.replace(plan.shared.merge, most_parts=parts)))

    many, too_many = reading(decode_graphs.PART_TIERS[0] + 1), reading(decode_graphs.PART_TIERS[-1] + 1)
    sglang_label = lambda runner, batch: None  # noqa: E731 (SGLang's, without LoRA)
    resolve = lambda p: hooks.link_graph_variant(sglang_label, None, types.SimpleNamespace(epic_plan=p))  # noqa: E731
    assert resolve(plan) == f"epic{decode_graphs.PART_TIERS[0]}" and resolve(many) == f"epic{decode_graphs.PART_TIERS[1]}"
    assert resolve(None) is None and resolve(dataclasses.replace(plan, shared=None)) is None

    # a linked step SGLang's runner cannot graph (or no tier holds) is counted as eager
    monkeypatch.setattr(decode_graphs, "STEPS", Tally(decode_graphs.STEPS.what, every=2))
    can_run = lambda fits: lambda runner, batch: fits  # noqa: E731 (SGLang's own answer)
    step = lambda p: types.SimpleNamespace(epic_plan=p, batch_size=p.batch_size if p else 1)  # noqa: E731
    graphed = types.SimpleNamespace()
    assert hooks.decode_graph_for_links(can_run(True), graphed, step(plan))
    assert not hooks.decode_graph_for_links(can_run(False), graphed, step(plan))
    assert not hooks.decode_graph_for_links(can_run(True), graphed, step(too_many))
    assert hooks.decode_graph_for_links(can_run(True), graphed, step(None))  # plain steps are not counted
    assert not hooks.decode_graph_for_links(can_run(False), graphed, step(None))
    assert decode_graphs.STEPS.counts == {"eager": 2}
    with caplog.at_level(logging.INFO, logger=tally.__name__):
        decode_graphs.STEPS.add("epic8")
        decode_graphs.STEPS.add("epic8")
    assert [r.getMessage() for r in caplog.records] == [
        "epic: decode steps over shared documents so far: {'eager': 2, 'epic8': 2}"]
    for req in reqs:
        s.finish(req)


def test_a_mixed_batch_scores_new_link_passes_and_running_decodes_exactly(sglang_runtime):
    """SGLang's mixed chunk puts new link passes and running requests' decode steps in one
    forward: each scores exactly the tokens at or before it, then both decode on together."""
    s = Scheduler()
    ids_a, spans_a, _ = s.compiled_prompt(1)
    ids_b, spans_b, _ = s.compiled_prompt(2)
    a = s.request(ids_a, LinkHint("ns", tuple(spans_a), 2))
    s.prefill([a])
    s.decode_step(5)
    b = s.request(ids_b, LinkHint("ns", tuple(spans_b), 3))
    admitted, plan = s.mixed_step([b], 6)
    assert admitted == [b] and s.batch.forward_mode.is_mixed() and plan.shared is not None
    assert_link_scores(s, plan, b, ids_b, 0)
    assert_link_scores(s, plan, a, ids_a, s.batch.extend_lens[0])
    step = s.decode_step(7)
    assert_link_scores(s, step, b, ids_b, 0)
    assert_link_scores(s, step, a, ids_a, 1)
    for req in (a, b):
        s.finish(req)
    assert s.cache.evictable_size() == s.cache.total_size()


@pytest.mark.parametrize("query_k", [0, 9])  # legolink-4; querylink-9-h4 (its scout runs again, over the output too)
def test_a_retracted_linked_request_links_again_with_its_output_computed(sglang_runtime, query_k):
    from sglang.srt.mem_cache.common import release_kv_cache

    s = Scheduler()
    ids, spans, docs = s.compiled_prompt(8)
    free = s.allocator.available_size()
    req = s.request(ids, LinkHint("ns", tuple(spans), 4, query_k=query_k), max_new_tokens=8)
    s.prefill([req])
    s.decode_step(5)
    s.decode_step(6)
    release_kv_cache(req, s.cache, is_insert=False)  # what SGLang's retract_decode does
    req.reset_for_retract()
    assert s.allocator.available_size() == free - spans[0][0]  # only the published exact prefix stays
    assert all(n.lock_ref == 0 for n in s.cache.document_nodes().values())
    s.layer_calls = []
    admitted, plan = s.prefill([req])
    layout = req.epic_link.layout
    assert admitted == [req] and layout.prompt_len == len(ids) + 2 and layout.exact_prefix_len == spans[0][0]
    assert len(s.layer_calls) == (LAYERS + 1 if query_k else 0)  # the scout and the link pass's first layer
    assert req.epic_link.scout is None and plan.scouts == []
    assert not query_k or s.layer_calls[0][1][-2:] == [len(ids), len(ids) + 1]  # the output: scouted, past the prompt
    assert req.cached_tokens == layout.reused_tokens  # counted once, at the first link (no exact prefix yet)
    assert_link_scores(s, plan, req, ids)  # the earlier output is computed at its positions
    assert_link_scores(s, s.decode_step(7), req, ids)
    s.finish(req)
    assert s.allocator.available_size() == free - spans[0][0]


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
    admitted, plan = s.prefill([req])
    layout = req.epic_link.layout
    assert admitted == [req] and [r.length for r in layout.cached_runs] == [20, 17]
    s.assert_row_at_prompt_positions(req, ids, layer=1)
    assert_link_scores(s, plan, req, ids)  # keys compiled at t + 4, scored at their place
    assert_link_scores(s, s.decode_step(), req, ids)
    s.finish(req)


def test_release_publishes_the_exact_prefix_frees_everything_else_and_unlocks(sglang_runtime):
    s = Scheduler()
    ids, spans, docs = s.compiled_prompt(2)
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


def test_a_waiting_request_keeps_its_match_until_a_document_is_evicted_or_was_missing(sglang_runtime):
    """SGLang matches every waiting request twice a scheduling round: a match that found every
    document stands (no lookups) until one of them is evicted; one that missed a document
    looks again, and finds it once compiled."""
    s = Scheduler()
    ids, spans, docs = s.compiled_prompt(7)
    req = s.request(ids, LinkHint("ns", tuple(spans), 2))
    req.init_next_round_input(s.cache)
    first, lookups = req.epic_link.matched[1], s.cache.counters.device_hits
    req.init_next_round_input(s.cache)
    assert req.epic_link.matched[1] is first and s.cache.counters.device_hits == lookups
    s.cache.flush()  # evicted: matched again, the documents now computed in place
    req.init_next_round_input(s.cache)
    assert req.epic_link.matched[1] is not first and req.epic_link.layout.cached_runs == ()
    s.compile(docs[1])  # compiled since the miss: found at the next round
    req.init_next_round_input(s.cache)
    assert [r.doc for r in req.epic_link.layout.cached_runs] == [1]
    assert s.prefill([req])[0] == [req]
    s.assert_row_at_prompt_positions(req, ids, layer=0)
    s.finish(req)
    assert s.cache.evictable_size() == s.cache.total_size()


def test_a_linked_request_is_admitted_only_if_its_tokens_fit_beside_its_locked_documents(sglang_runtime):
    """SGLang's prefill budget counts evictable tokens as room; a linked request's documents are
    locked before its budget is read, so they are not counted as room for its own tokens: a
    request whose computed tokens fit only by evicting its own documents waits (documents
    unlocked again) instead of being admitted and running the pool out of memory."""
    s = Scheduler(size=80)
    ids, spans, docs = prompt(random.Random(5), sizes=(6, 30, 40, 30, 9))  # prefix | doc | gap | doc | question
    for doc in docs:
        s.compile(doc)
    assert s.allocator.available_size() == 20 and s.cache.evictable_size() == 60
    req = s.request(ids, LinkHint("ns", tuple(spans), 0))  # computes 6 + 40 + 9 = 55 tokens: more than the 20 free
    assert s.prefill([req])[0] == []
    assert all(n.lock_ref == 0 for n in s.cache.document_nodes().values())
    small = s.request(ids[:6] + docs[0] + ids[-9:], LinkHint("ns", ((6, 36),), 0), max_new_tokens=2)
    assert s.prefill([small])[0] == [small]  # 15 computed + 2 new tokens fit in the 20
    s.finish(small)
    assert s.allocator.available_size() + s.cache.evictable_size() == 80


def entry_keys(entries, causal: bool) -> dict[int, list[int]]:
    """Query row -> the slots its entries attend (causal: bottom-right aligned, FlashInfer's)."""
    qo, kv, slots = entries.qo_indptr.tolist(), entries.kv_indptr.tolist(), entries.kv_indices.tolist()
    seen = {}
    for e in range(len(qo) - 1):
        queries, keys = qo[e + 1] - qo[e], slots[kv[e]:kv[e + 1]]
        for j in range(queries):
            seen.setdefault(qo[e] + j, []).extend(keys[:len(keys) - queries + j + 1] if causal else keys)
    return seen


def test_cacheblend_picks_the_deviating_tokens_copies_the_rest_and_attends_each_pick_to_its_past(sglang_runtime,
                                                                                                  monkeypatch):
    """CacheBlend inside SGLang's forward (`blend.py`), on SGLang's real cache classes: its
    row is the whole prompt; at the check layer the document tokens whose fresh KV deviates
    most from their documents' (the cached keys rotated to the prompt positions) are picked
    with every token outside the documents and the last; the other document tokens' KV of the
    later layers is copied from the documents, keys rotated to their prompt positions (the
    documents untouched); the later layers compute the picks only, each attending exactly the
    keys at or before its position, and hand SGLang the batch's full shape back."""
    from epic_sglang.link_plan import CascadeTuning
    from epic_sglang.policies import CACHEBLEND_CHECK_LAYER
    from epic_sglang.sglang_plugin import blend

    s = Scheduler()
    ids, spans, docs = s.compiled_prompt(11)
    shared = {k: [b[n.value].clone() for b in s.kv.k_buffer + s.kv.v_buffer] for k, n in s.cache.document_nodes().items()}
    recorded = {}
    monkeypatch.setattr(blend, "plan_cut", lambda backend, local, bulk, spans_, rope: recorded.update(
        local=local, bulk=bulk, spans=spans_))
    monkeypatch.setattr("sglang.srt.model_executor.forward_context.get_attn_backend", lambda: None)
    monkeypatch.setattr("sglang.srt.model_executor.forward_context.get_token_to_kv_pool", lambda: s.kv)
    in_docs = {p for a, b in spans for p in range(a, b)}
    later = range(CACHEBLEND_CHECK_LAYER + 1, LAYERS)

    def layer_forward(layer, positions, h, forward_batch, r):
        calls.append((layer.self_attn.attn.layer_id, positions.tolist(), h.shape[0], forward_batch.out_cache_loc.tolist()))
        return h + 1, r + 1

    def attended(local, bulk_entries, bulk_spans) -> dict[int, list[int]]:
        """Each cut row's slots: its local entry's, and its group's bulk entries' (their queries
        gathered by the spans)."""
        seen = entry_keys(local, causal=True)
        gathered = [q for a, b in bulk_spans for q in range(a, b)]
        for g, keys in (entry_keys(bulk_entries, causal=False) if bulk_entries is not None else {}).items():
            seen[gathered[g]] += keys
        return {i: sorted(k) for i, k in seen.items()}

    for start in (0, spans[0][0]):  # the second time the prefix before the documents is the tree's
        req = s.request(ids, LinkHint("ns", tuple(spans), blend=8.0))  # ceil(8% of 37 document tokens) = 3
        admitted, plan = s.prefill([req])
        link, row = req.epic_link, s.row(req).to(torch.int64)
        assert admitted == [req] and link.layout.order.tolist() == list(range(len(ids))) and link.shared is None
        assert req.cached_tokens == start + 37 - 3 and plan.blend.extend_start == start
        s.assert_row_at_prompt_positions(req, ids, layer=0)  # up to the check layer: every token computed
        planted = [spans[0][0] + 4, spans[1][0] + 1, spans[1][0] + 16]
        s.kv.k_buffer[CACHEBLEND_CHECK_LAYER][row[planted]] += 0.05  # a little off the documents' (rotated right, the rest match)
        picked = blend.picked_positions(plan.blend, s.kv, s.rope)
        assert picked.tolist() == sorted(
            {p for p in range(start, len(ids)) if p not in in_docs} | {len(ids) - 1} | set(planted))
        unpicked = sorted(in_docs - set(picked.tolist()))
        for layer in later:  # what the copy must fill
            s.kv.k_buffer[layer][row[unpicked]] = 0
            s.kv.v_buffer[layer][row[unpicked]] = 0
        extend = len(ids) - start
        hidden, residual = torch.randn(extend, 4), torch.randn(extend, 4)
        fb = types.SimpleNamespace(epic_plan=plan, out_cache_loc=row[start:].clone())
        calls, out = [], (hidden, residual)
        for layer_id in range(LAYERS):
            layer = types.SimpleNamespace(self_attn=types.SimpleNamespace(attn=types.SimpleNamespace(layer_id=layer_id)))
            out = blend.blend_layer(layer_forward, layer, torch.arange(start, len(ids)), out[0], fb, out[1])
        for layer_id, positions, rows, locs in calls:
            assert positions == (picked.tolist() if layer_id > CACHEBLEND_CHECK_LAYER else list(range(start, len(ids))))
            assert rows == len(positions) and locs == row[positions].tolist()
        assert fb.out_cache_loc.tolist() == row[start:].tolist()  # given back after the last layer
        kept = torch.zeros(extend, dtype=torch.bool)
        kept[picked - start] = True
        torch.testing.assert_close(out[0][kept], hidden[kept] + LAYERS)
        assert (out[0][~kept] == 0).all() and (out[1][~kept] == 0).all()  # cut away: zero (SGLang reads the last)
        for layer in later:
            for p in unpicked:
                torch.testing.assert_close(s.kv.k_buffer[layer][row[p]], s.key(ids[p], p), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(s.kv.v_buffer[layer][row[p]], s.base(ids[p]))
        # each pick (a row of the cut batch) attends exactly the row's slots at or before its position
        expected = {i: sorted(row[:p + 1].tolist()) for i, p in enumerate(picked.tolist())}
        assert attended(recorded["local"], recorded["bulk"], recorded["spans"]) == expected
        cascaded = blend.cut_plan(plan.blend, picked, CascadeTuning(group=4, chunk=8))  # groups of 4: bulk entries
        assert cascaded[2] and attended(*cascaded) == expected
        s.finish(req)
        for k, n in s.cache.document_nodes().items():  # read, never written
            assert all(torch.equal(a, b[n.value]) for a, b in zip(shared[k], s.kv.k_buffer + s.kv.v_buffer))
    assert s.cache.evictable_size() == s.cache.total_size()


def test_cacheblend_it_cannot_cut_computes_every_token_and_says_so(sglang_runtime):
    """A model whose decoder layers the plugin does not hook, or a batch SGLang mixed other
    requests into: no cut, every token through every layer, `cached_tokens` without the reuse."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.models.llama import LlamaDecoderLayer

    from epic_sglang.sglang_plugin import blend

    llama = LlamaDecoderLayer.__new__(LlamaDecoderLayer)
    torch.nn.Module.__init__(llama)
    assert blend.supports(torch.nn.Sequential(llama)) and not blend.supports(torch.nn.Sequential(torch.nn.Linear(1, 1)))
    s = Scheduler()
    ids, spans, _ = s.compiled_prompt(12)
    req = s.request(ids, LinkHint("ns", tuple(spans), blend=8.0))
    s.prefill([req])
    assert req.cached_tokens == 34
    req.epic_link.extending = True  # its link pass, as the forward's set-up sees it
    fb = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, positions=torch.arange(len(ids)))
    runner = types.SimpleNamespace(epic_rope=s.rope, model=torch.nn.Sequential(torch.nn.Linear(1, 1)))
    assert hooks.link_forward_batch(fb, None, s.batch, runner).epic_plan.blend is None  # no cut: all layers, all tokens
    assert req.cached_tokens == 0 and req.epic_link.reused_tokens == 0
    s.finish(req)
    req, plain = s.request(ids, LinkHint("ns", tuple(spans), blend=8.0)), s.request(list(range(3000, 3010)))
    s.prefill([req]), s.prefill([plain])
    assert req.cached_tokens == 6 + 34  # the exact prefix is the tree's now
    req.epic_link.extending = True
    mixed = types.SimpleNamespace(reqs=[req, plain], seq_lens_cpu=torch.tensor([len(ids), 10]),
                                  extend_lens=[len(ids) - 6, 10], device=torch.device("cpu"), req_to_token_pool=s.req_pool)
    fb.positions = torch.arange(len(ids) - 6 + 10)
    runner = types.SimpleNamespace(epic_rope=s.rope, model=torch.nn.Sequential(llama))
    assert hooks.link_forward_batch(fb, None, mixed, runner).epic_plan.blend is None
    assert req.cached_tokens == 6
    s.finish(req), s.finish(plain)


def test_querylink_scouts_over_shared_documents_links_its_picks_and_decodes_over_them(sglang_runtime, monkeypatch,
                                                                                      link_attention):
    """querylink inside SGLang's forward (`scout.py`), on SGLang's real cache classes: its row
    holds legolink-k's tokens as stand-ins; entering the first layer the scout runs the
    tokens outside the documents through the layers over every prompt position before each
    (documents in their shared slots at their prompt positions) and the question's mass on
    each key is the dense definition's; the picks (a planted needle among them) take the
    stand-ins' slots, the batch's ids and positions follow, the link pass scores each query
    exactly at its prompt positions, a decode step too, documents untouched."""
    from epic_sglang.link_plan import querylink_pick, with_picks
    from epic_sglang.sglang_plugin import scout

    s = Scheduler()
    ids, spans, docs = s.compiled_prompt(13)
    nodes = s.cache.document_nodes()
    needle = spans[1][0] + 12  # past legolink-6's stand-ins
    needle_slot = s.cache.document_slots(next(n for n in nodes.values() if len(n.value) == 17))[12]
    for layer in range(LAYERS):  # its value's norm dominates the mass
        s.kv.v_buffer[layer][needle_slot] *= 50
    shared = {k: [b[n.value].clone() for b in s.kv.k_buffer + s.kv.v_buffer] for k, n in nodes.items()}
    masses = []
    monkeypatch.setattr(scout, "querylink_pick", lambda mass, *a: masses.append(mass) or querylink_pick(mass, *a))
    req = s.request(ids, LinkHint("ns", tuple(spans), 2, query_k=6))  # budget (6 - 2) x 2 = 8
    head = plan_spans(len(ids), [(a, b - a, j) for j, (a, b) in enumerate(spans)], 2)
    stand_ins = plan_rows(plan_spans(len(ids), head.doc_spans, 6), 0).extend_positions.tolist()
    admitted, plan = s.prefill([req])
    link = req.epic_link
    assert req.cached_tokens == 37 - 12 and link.scout is None

    scouted = [p for p in range(len(ids)) if not any(a <= p < b for a, b in spans)]
    assert s.layer_calls[:LAYERS] == [(i, scouted) for i in range(LAYERS)]  # the scout: the text outside the documents
    # the question's mass on each key: the dense definition over every position, at its prompt position
    expected = torch.zeros(len(ids))
    v_norm = {p: s.base(ids[p]).norm(dim=-1) * (50 if p == needle else 1) for p in range(len(ids))}
    for p in range(spans[1][1], len(ids)):  # the question (after the last document), every layer
        q = s.key(ids[p], p)
        logits = torch.stack([(q * s.key(ids[j], j)).sum(-1) for j in range(p + 1)]) * DIM ** -0.5  # (keys, heads)
        expected[:p + 1] += LAYERS * (torch.softmax(logits, 0) * torch.stack([v_norm[j] for j in range(p + 1)])).sum(-1)
    torch.testing.assert_close(masses[0], expected, atol=1e-4, rtol=1e-4)
    head.pick_budget = 8
    picks = querylink_pick(expected, head, 1)
    assert needle in picks.tolist() and len(picks) == 8 and needle not in stand_ins
    assert link.layout.order.tolist() == plan_rows(with_picks(head, picks), 0).order.tolist()
    extend = link.layout.extend_positions.tolist()
    assert s.scout_batch.positions.tolist() == extend  # rewritten in place
    assert s.scout_batch.input_ids.tolist() == [ids[p] for p in extend] == list(req.origin_input_ids)
    assert s.layer_calls[LAYERS] == (0, extend)  # then the link pass, from the new row's embeddings
    assert torch.equal(s.embedded[:, 0], s.scout_batch.input_ids.float())
    assert s.replanned is plan and plan.scouts == []
    assert (plan.gathered is not None) == (link_attention == "gathered")  # planned over the picks
    s.assert_row_at_prompt_positions(req, ids, layer=0)
    assert_link_scores(s, plan, req, ids)
    assert_link_scores(s, s.decode_step(), req, ids)
    s.finish(req)
    for k, n in nodes.items():  # read, never written
        assert all(torch.equal(a, b[n.value]) for a, b in zip(shared[k], s.kv.k_buffer + s.kv.v_buffer))
    assert s.cache.evictable_size() == s.cache.total_size()


def test_querylink_scouts_beside_other_requests_and_without_its_scout_links_legolink_ks_tokens(sglang_runtime):
    """querylink link passes are admitted with any other request but CacheBlend's; in a
    forward beside a plain request and a running linked request's decode (SGLang's mixed
    chunk), each scouts and every query of the batch scores exactly. A model whose RoPE the
    scout's kernels cannot rotate links the stand-ins, legolink-k's tokens, and says so."""
    from epic_sglang.sglang_plugin import scout

    s = Scheduler(size=2048)
    ids, spans, _ = s.compiled_prompt(14)
    other, other_spans, _ = s.compiled_prompt(15)
    running = s.request(other, LinkHint("ns", tuple(other_spans), 3))
    s.prefill([running])
    first = s.request(ids, LinkHint("ns", tuple(spans), 2, query_k=6))
    second = s.request(other, LinkHint("ns", tuple(other_spans), 1, query_k=9))
    plain = s.request(list(range(3000, 3010)))
    blend = s.request(ids, LinkHint("ns", tuple(spans), blend=10.0))
    admitted = s.admit([first, plain, second, blend])
    assert admitted == [first, plain, second]  # CacheBlend's waits for a batch of its own
    new = s.extend_batch(admitted)
    s.sample(3)
    new.mix_with_running(s.batch)
    s.batch = new
    plan = s.forward(new)
    assert plan.scouts == [] and s.layer_calls[0][1] == [  # both scouts, in one cut batch
        p for req in (first, second) for p in req.epic_link.layout.order.tolist()
        if not any(a <= p < b for a, b in req.epic_link.hint.docs)]
    starts = np.cumsum([0] + new.extend_lens)
    for i, (req, prompt_ids) in enumerate([(first, ids), (second, other), (running, other)]):
        assert_link_scores(s, plan, req, prompt_ids, int(starts[[0, 2, 3][i]]))
    assert_link_scores(s, s.decode_step(), first, ids, 0)

    s.head_dim = 2 * DIM  # RoPE over half the head: no scout
    query = s.request(ids, LinkHint("ns", tuple(spans), 2, query_k=6))
    s.layer_calls = []
    s.prefill([query])
    legolink6 = plan_rows(plan_spans(len(ids), [(a, b - a, j) for j, (a, b) in enumerate(spans)], 6), spans[0][0])
    assert s.layer_calls == [] and query.epic_link.scout is None
    assert query.epic_link.layout.order.tolist() == legolink6.order.tolist()
    assert scout.unread_rope(dataclasses.replace(s.rope, is_neox_style=False), DIM)  # GPT-J style: no scout either
    assert scout.unread_rope(s.rope, DIM) is None


def test_a_document_node_split_by_a_partial_match_still_links_whole(sglang_runtime):
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from radix_ext.doc_key import doc_extra_key, document_key

    s = Scheduler()
    ids, spans, docs = s.compiled_prompt(5)
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


def test_a_document_longer_than_the_prefill_chunk_compiles_in_chunks_and_frees_nothing_twice(sglang_runtime):
    """SGLang cuts a prefill longer than its chunk and stashes each chunk (`cache_unfinished_req`),
    the next chunk going on from the stashed prefix. A compile is never published part-way, but its
    chunks stay in its row: the document is cached whole once, with every token's KV at its
    position, and the pool gets back every other slot (before, each chunk restarted from the
    first token and the earlier chunks' slots were lost)."""
    s = Scheduler(chunk=16)
    doc = list(range(500, 540))  # 40 tokens: chunks of 16, 16, 8
    s.compile(doc)
    node = s.cache.document_nodes()
    assert len(node) == 1 and s.allocator.available_size() + s.cache.evictable_size() == 1024
    slots = s.cache.document_slots(next(iter(node.values())))
    assert len(slots) == len(doc)
    for layer in range(LAYERS):
        expected = torch.stack([s.key(t, p) for p, t in enumerate(doc)])
        torch.testing.assert_close(s.kv.k_buffer[layer][slots], expected, atol=1e-5, rtol=1e-5)


def test_every_slot_is_free_or_in_the_tree_after_random_traffic_under_pressure(sglang_runtime):
    """Property (SGLang's own idle check, `available + evictable + protected == pool`): rounds of
    compiles (some cut into chunks), linked (querylink among them) and plain requests over a pool
    too small for every document, requests left waiting across rounds, some retracted after
    decoding; after every round each slot is free or in the tree, and nothing stays locked."""
    from sglang.srt.mem_cache.common import release_kv_cache

    size = 700
    for seed in range(3):
        rng = random.Random(seed)
        s = Scheduler(size=size, chunk=48)
        docs = [list(range(3000 + 100 * j, 3000 + 100 * j + rng.randint(20, 70))) for j in range(25)]
        waiting = []
        for _ in range(30):
            compiles = [s.request(docs[j], LinkHint("ns", compile=True), max_new_tokens=0)
                        for j in rng.sample(range(len(docs)), rng.randint(0, 3))]
            for _ in range(rng.randint(0, 3)):
                ids, spans = [101, 102, 103][:rng.randint(1, 3)], []
                for j in rng.sample(range(len(docs)), rng.randint(1, 3)):
                    spans.append((len(ids), len(ids) + len(docs[j])))
                    ids += docs[j]
                ids += [rng.randint(300, 399) for _ in range(rng.randint(1, 6))]
                k = rng.randint(0, 6)
                hint = ("ns" if rng.random() < 0.3 else LinkHint("ns", tuple(spans), k, query_k=k + rng.randint(1, 8))
                        if rng.random() < 0.6 else LinkHint("ns", tuple(spans), k))  # querylink: its scout runs
                waiting.append(s.request(ids, hint, max_new_tokens=3))
            batch = compiles + waiting
            rng.shuffle(batch)
            admitted, _ = s.prefill(batch) if batch else ([], None)
            while s.chunked is not None:  # SGLang finishes a cut request's chunks first
                s.next_chunk()
            waiting = [r for r in waiting if r not in admitted]
            if admitted:
                for token in range(rng.randint(0, 2)):
                    s.decode_step(5 + token)
                for req in admitted:
                    if req.output_ids and rng.random() < 0.2:
                        release_kv_cache(req, s.cache, is_insert=False)  # retracted: waits again
                        req.reset_for_retract()
                        waiting.append(req)
                    else:
                        s.finish(req)
            assert s.allocator.available_size() + s.cache.evictable_size() + s.cache.protected_size() == size
        assert s.cache.protected_size() == 0


def test_a_link_pass_wider_than_a_prefill_chunk_falls_back_to_a_full_prefill(sglang_runtime):
    s = Scheduler(chunk=16)
    ids, spans, docs = s.compiled_prompt(4)
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
    from epic_sglang.sglang_plugin.launch import SGLangServer, server_command, server_env

    cmd = server_command("/models/m", 30001, host="0.0.0.0")
    assert cmd[1:3] == ["-m", "sglang.launch_server"] and "--radix-cache-backend" in cmd
    assert cmd[cmd.index("--attention-backend") + 1] == "flashinfer"
    assert "--radix-cache-backend" not in server_command("/models/m", 30001, plugin=False)
    assert server_env(True, kv_dir="/kv")["EPIC_SGLANG_KV_DIR"] == "/kv" and server_env(False)["SGLANG_PLUGINS"] == "-"
    assert main(["serve", "--engine", "sglang", "--policy", "querylink-0"]) == 2
    assert "error: querylink needs k >= 1" in capsys.readouterr().err  # every policy is served; a bad one is refused
    assert main(["serve", "--engine", "sglang", "--sglang-port", "70000"]) == 2
    assert "--sglang-port must be in 1..65535" in capsys.readouterr().err
    assert main(["serve", "--engine", "sglang", "--sglang-args", "--tp 2 --port=9"]) == 2
    assert "--sglang-args may not set --port: use --model / --sglang-port" in capsys.readouterr().err
    assert main(["serve", "--engine", "sglang", "--sglang-args", "--tp 2 --api-key=k"]) == 2
    assert "--sglang-args may not set --api-key: use --model / --sglang-port / --api-key" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--engine", "sglang", "--api-key", "k",
                                      "--sglang-args", "--tp 2 --mem-fraction-static 0.8"])
    extra = sglang_server_args(args)
    assert extra[-4:] == ["--tp", "2", "--mem-fraction-static", "0.8"]
    server = SGLangServer("/models/m", 30001, extra=extra, api_key="k")  # SGLang asks for it, the warm-up sends it
    assert server.cmd[server.cmd.index("--api-key") + 1] == "k" and server.cmd.count("--api-key") == 1
    if not torch.cuda.is_available():
        assert main(["serve", "--engine", "sglang"]) == 2
        assert "need a CUDA GPU" in capsys.readouterr().err


def test_a_plugin_server_is_ready_only_after_its_link_path_ran_once():
    """The warm-up compiles two documents, links them, then links one of them beside a document
    never compiled (computed in the row), then links them with querylink (its scout runs), each
    with a decode step, then links them again while a streamed linked request is still decoding
    (what SGLang's mixed chunk runs in one forward), then compiles and links a RAG-shaped
    prompt (8 x 512-token documents, legolink-16, greedy), apart from every tenant; a server
    that refuses it is not ready, with a message naming it."""
    from epic_sglang.server.background import serve_in_thread
    from epic_sglang.sglang_plugin.launch import WARMUP_NAMESPACE, WARMUP_QUERYLINK, warm_link_path, warmup_prompts

    bodies, status, overlapped, longest = [], {"code": 200}, [], {"tokens": 8191}
    arrived = asyncio.Event()  # a request came while a streamed one was decoding
    app = FastAPI()

    @app.get("/server_info")
    async def server_info():  # SGLang's scheduler reports the longest prompt it takes
        return {"max_req_input_len": longest["tokens"]}

    @app.post("/generate")
    async def generate(request: Request):
        if request.headers.get("Authorization") != "Bearer k":  # as SGLang started with --api-key k
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        body = await request.json()
        bodies.append(body)
        arrived.set()
        if not body.get("stream") or status["code"] != 200:
            return JSONResponse({"output_ids": [1], "meta_info": {"cached_tokens": 0}}, status_code=status["code"])

        async def tokens():
            arrived.clear()
            yield 'data: {"output_ids": [1]}\n\n'
            try:  # holds its decode open until the next request arrives
                await asyncio.wait_for(arrived.wait(), 10)
                overlapped.append(True)
            except asyncio.TimeoutError:
                overlapped.append(False)
            yield "data: [DONE]\n\n"
        return StreamingResponse(tokens(), media_type="text/event-stream")

    with serve_in_thread(app) as url:
        with pytest.raises(RuntimeError, match="link warm-up: 401"):
            warm_link_path(url)  # SGLang's API key is not optional
        warm_link_path(url, api_key="k")
        hints = [decode(b["extra_key"]) for b in bodies]
        compiled = {tuple(b["input_ids"]) for b, h in zip(bodies, hints) if h.compile}
        links = [(b, h) for b, h in zip(bodies, hints) if not h.compile]
        assert len(compiled) == 2 + 8 and len(links) == 6 and not hints[-1].compile and hints[0].compile
        # a link pass sent while a linked request decodes (SGLang's mixed chunk runs them in one forward)
        assert [b.get("stream", False) for b, _ in links] == [False, False, False, True, False, False] and overlapped == [True]
        rag, rag_hint = links[-1]  # the RAG-shaped request, over its 8 compiled documents, greedy
        assert [e - a for a, e in rag_hint.docs] == [512] * 8 and rag_hint.docs[0][0] == 32 and len(rag["input_ids"]) == 32 + 8 * 512 + 64
        assert all(tuple(rag["input_ids"][a:e]) in compiled for a, e in rag_hint.docs) and rag_hint.k == 16
        assert rag["sampling_params"]["temperature"] == 0.0 and max(rag["input_ids"]) < 49152
        for tokens, documents in ((2000, 3), (600, 0), (100, 0)):  # a shorter context: as many documents as it holds, or none
            longest["tokens"] = tokens
            bodies.clear()
            warm_link_path(url, api_key="k")
            rag = [b for b in bodies if decode(b["extra_key"]).k == 16]
            assert [len(decode(b["extra_key"]).docs) for b in rag] == ([documents] if documents else [])
            assert all(len(b["input_ids"]) + b["sampling_params"]["max_new_tokens"] <= tokens for b in rag)
        longest["tokens"] = 8191
        assert all(h.namespace == WARMUP_NAMESPACE for h in hints)
        docs = [[tuple(b["input_ids"][a:e]) for a, e in h.docs] for b, h in links[:5]]
        assert all(d in compiled for d in docs[0]) and docs[2] == docs[0] == docs[3] == docs[4]  # every document reused
        assert sum(d not in compiled for d in docs[1]) == 1  # one computed in its row
        scouted = parse_policy(WARMUP_QUERYLINK)
        assert links[2][1].query_k == scouted.k and plan_link(scouted, warmup_prompts()[0]).pick_budget > 0
        assert all(b["sampling_params"]["max_new_tokens"] >= 2 for b, _ in links)  # a decode step too
        status["code"] = 400
        with pytest.raises(RuntimeError, match=f"SGLang server at {url} failed the plugin's link warm-up: 400"):
            warm_link_path(url, api_key="k")


# ----------------------------------------------------------------- on a GPU, through FlashInfer
@pytest.mark.gpu
@pytest.mark.parametrize("sink", [0, 4])
def test_link_attention_through_flashinfer_scores_shared_documents_in_place_at_their_prompt_positions(sink,
                                                                                                     link_attention):
    """The plan SGLang's FlashInfer backend gets for a link pass and for a decode step after it
    (the row's causal entry or SGLang's own decode plan; each cached run attended by the
    queries after it, rotated back by the run's shift, over the documents' shared slots, merged
    by log-sum-exp; or, for the link pass, its keys gathered in prompt order into a scratch and
    the engine's cascade over it) attends each query to exactly the keys at or before its prompt position,
    each as if rotated there: dense masked attention in fp32, within bf16; the decode step also
    inside a CUDA graph captured over padding entries and replayed with the step's entries."""
    flashinfer = pytest.importorskip("flashinfer")
    from sglang.srt.layers.attention.flashinfer_backend import DecodeMetadata

    from epic_sglang.sglang_plugin.link_request import SharedRuns

    dev, q_heads, kv_heads, dim, bf16 = torch.device("cuda"), 8, 2, 128, torch.bfloat16
    docs = [(16 + 100 * i, 16 + 100 * (i + 1)) for i in range(8)]  # as many as the small decode graph holds
    n = docs[-1][1] + 24
    layout = plan_rows(plan_spans(n, [(a, b - a, j) for j, (a, b) in enumerate(docs)], 16), exact_prefix_len=16)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.arange(4 * n, dtype=torch.float32)[:, None] * inv_freq
    rope = RopeTable(torch.cat([angles.cos(), angles.sin()], -1).to(dev), dim, True)

    def rotated(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return rope.rotate(x.float(), *rope.angles(positions.to(dev))).to(bf16)

    g = torch.Generator(device=dev).manual_seed(0)
    k_base, v = (torch.randn(n + 1, kv_heads, dim, device=dev, generator=g) for _ in range(2))
    q_base = torch.randn(n + 1, q_heads, dim, device=dev, generator=g)
    slot_of = torch.randperm(4 * n, device=dev, generator=g)[:n + 1]  # pool slot of each position (+ a decode token)
    k_pool = torch.zeros(4 * n, kv_heads, dim, device=dev, dtype=bf16)
    v_pool = torch.zeros_like(k_pool)
    stored_at = torch.arange(n + 1)  # private tokens: rotated at their positions; documents: at compile positions
    for r in layout.cached_runs:
        stored_at[r.start:r.start + r.length] = torch.arange(r.offset, r.offset + r.length) + sink
    runs = layout.cached_runs
    for r in runs[2:]:  # documents 2, 3, ... are documents 0 and 1 again: the same keys in the same slots
        src = runs[r.doc % 2]
        k_base[r.start:r.start + r.length], v[r.start:r.start + r.length] = (x[src.start:src.start + src.length]
                                                                          for x in (k_base, v))
        slot_of[r.start:r.start + r.length] = slot_of[src.start:src.start + src.length]
    v_pool[slot_of] = v.to(bf16)
    k_pool[slot_of] = rotated(k_base, stored_at)
    shared = SharedRuns(torch.cat([slot_of[r.start:r.start + r.length] for r in runs]).int(), [r.length for r in runs],
                        torch.tensor([r.start - r.offset - sink for r in runs]),
                        [(r.doc % 2, r.offset, r.length) for r in runs], [r.doc for r in runs])  # runs read again: one entry each
    row = slot_of[torch.from_numpy(np.concatenate([layout.order, [n]])).to(dev)]
    link = types.SimpleNamespace(layout=layout, shared=shared, extending=True, position_shift=layout.reused_tokens,
                                 blend=None, scout=None)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    backend = types.SimpleNamespace(
        num_wrappers=1, workspace_buffer=workspace,
        prefill_wrappers_paged=[flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend="fa2")],
        indices_updater_prefill=types.SimpleNamespace(num_qo_heads=q_heads, num_kv_heads=kv_heads, head_dim=dim,
                                                      q_data_type=bf16, data_type=bf16))
    scale = dim ** -0.5

    def expected(positions: list[int]) -> torch.Tensor:
        keys = rotated(k_base, torch.arange(n + 1)).float().repeat_interleave(q_heads // kv_heads, dim=1)
        values = v_pool[slot_of].float().repeat_interleave(q_heads // kv_heads, dim=1)
        out = []
        for p in positions:
            q = rotated(q_base[p:p + 1], torch.tensor([p]))[0].float()
            weights = torch.softmax(torch.einsum("hd,khd->hk", q, keys[:p + 1]) * scale, dim=-1)
            out.append(torch.einsum("hk,khd->hd", weights, values[:p + 1]))
        return torch.stack(out)

    for decoding in (False, True):
        seq_len = len(layout.order) + decoding
        batch = types.SimpleNamespace(reqs=[types.SimpleNamespace(req_pool_idx=0)], extend_lens=[layout.extend_len],
                                      seq_lens_cpu=torch.tensor([seq_len]), device=dev,
                                      req_to_token_pool=types.SimpleNamespace(req_to_token=row[None].int()))
        link.extending = not decoding
        plan = attention.build_plan(batch, {0: link}, rope, decoding)
        positions = plan.positions[0].tolist()
        assert positions == (layout.extend_positions.tolist() if not decoding else [n])
        if decoding:
            own = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
            own.plan(torch.tensor([0, seq_len], dtype=torch.int32, device=dev), row[:seq_len].int(),
                     torch.ones(1, dtype=torch.int32, device=dev), q_heads, kv_heads, dim, 1,
                     q_data_type=bf16, kv_data_type=bf16)
            backend.forward_metadata = DecodeMetadata([own])
        attention.plan_flashinfer(backend, plan)
        assert (plan.gathered is not None) == (link_attention == "gathered" and not decoding)
        wrapper = (backend.forward_metadata.decode_wrappers if decoding else backend.forward_metadata.prefill_wrappers)[0]
        q = rotated(q_base[positions], torch.tensor(positions))
        kwargs = {} if decoding else {"causal": True}
        out = wrapper.forward(q, (k_pool, v_pool), sm_scale=scale, **kwargs)
        torch.testing.assert_close(out.float(), expected(positions), atol=2e-2, rtol=2e-2)

    # The same decode step inside a CUDA graph (`decode_graphs`) of every tier that holds it:
    # captured over padding entries only, then refilled from the step's plan and replayed.
    from epic_sglang.sglang_plugin import decode_graphs

    backend.decode_use_tensor_cores, backend.max_context_len = True, 4 * n
    tiers = [t for t in decode_graphs.PART_TIERS if decode_graphs.fits(plan, 1, t)]
    assert tiers == list(decode_graphs.PART_TIERS)  # the small tier too: the test covers every graph shape
    for tier in tiers:
        graph = decode_graphs.captured(backend, 1, tier, rope)
        own = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True,
            paged_kv_indptr_buffer=torch.zeros(2, dtype=torch.int32, device=dev),
            paged_kv_indices_buffer=torch.zeros(4 * n, dtype=torch.int32, device=dev),
            paged_kv_last_page_len_buffer=torch.ones(1, dtype=torch.int32, device=dev))

        def plan_own(length: int) -> None:  # SGLang's own graph wrapper over the request's row
            own.plan(torch.tensor([0, length], dtype=torch.int32), row[:length].int(),
                     torch.ones(1, dtype=torch.int32, device=dev), q_heads, kv_heads, dim, 1,
                     q_data_type=bf16, kv_data_type=bf16)

        plan_own(1)
        q_static, wrapper = torch.zeros_like(q), graph.link_wrapper(own)
        wrapper.forward(q_static, (k_pool, v_pool), sm_scale=scale)  # compiles the kernels outside the capture
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            out_static = wrapper.forward(q_static, (k_pool, v_pool), sm_scale=scale)
        plan_own(seq_len)
        graph.fill(backend, plan)
        q_static.copy_(q)
        cuda_graph.replay()
        torch.testing.assert_close(out_static.float(), expected([n]), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cacheblend_cut_through_flashinfer_attends_each_pick_to_its_past():
    """The cut layers' plan (`blend.plan_cut`: each pick's local causal entry, its group's bulk
    entries merged by log-sum-exp) through FlashInfer equals dense masked attention in fp32,
    within bf16."""
    pytest.importorskip("flashinfer")
    from epic_sglang.link_plan import CascadeTuning
    from epic_sglang.sglang_plugin import blend
    from epic_sglang.sglang_plugin.attention import BlendPass

    dev, q_heads, kv_heads, dim, bf16, n = torch.device("cuda"), 8, 2, 128, torch.bfloat16, 700
    g = torch.Generator(device=dev).manual_seed(1)
    k_pool, v_pool = (torch.randn(2 * n, kv_heads, dim, device=dev, generator=g).to(bf16) for _ in range(2))
    row = torch.randperm(2 * n, device=dev, generator=g)[:n]  # the row's slot of each position
    picked = np.sort(np.random.default_rng(0).choice(n - 1, 90, replace=False))
    picked = np.concatenate([picked[picked >= 40], [n - 1]])  # computed past the check layer (40 and on)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    backend = types.SimpleNamespace(workspace_buffer=workspace, indices_updater_prefill=types.SimpleNamespace(
        num_qo_heads=q_heads, num_kv_heads=kv_heads, head_dim=dim, q_data_type=bf16, data_type=bf16))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq
    rope = RopeTable(torch.cat([angles.cos(), angles.sin()], -1).to(dev), dim, True)
    cut = BlendPass(None, row, 40, None)
    q = torch.randn(len(picked), q_heads, dim, device=dev, generator=g).to(bf16)
    keys = k_pool[row].float().repeat_interleave(q_heads // kv_heads, dim=1)
    values = v_pool[row].float().repeat_interleave(q_heads // kv_heads, dim=1)
    expected = torch.stack([torch.einsum("hk,khd->hd", torch.softmax(
        torch.einsum("hd,khd->hk", q[i].float(), keys[:p + 1]) * dim ** -0.5, -1), values[:p + 1])
        for i, p in enumerate(picked.tolist())])
    for tuning in (CascadeTuning(), CascadeTuning(group=8, chunk=64)):  # one entry per run; bulk entries too
        local, bulk, spans = blend.cut_plan(cut, picked, tuning)
        blend.plan_cut(backend, local, bulk, spans, rope)
        out = backend.forward_metadata.prefill_wrappers[0].forward(q, (k_pool, v_pool), causal=True, sm_scale=dim ** -0.5)
        torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)



@pytest.mark.gpu
def test_querylink_scout_through_triton_equals_its_definition_over_keys_stored_rotated():
    """The plugin's scout wrapper (queries rotated by SGLang, keys read where they are stored,
    document ones rotated by their shift) through the Triton kernels equals the torch
    definition the CPU test checks, within bf16: outputs and the mass."""
    from epic_sglang.scout_attention import ScoutSeq, scout_layer_torch
    from epic_sglang.sglang_plugin.scout import ScoutWrapper

    dev, q_heads, kv_heads, dim, n = torch.device("cuda"), 8, 2, 128, 3000
    g = torch.Generator(device=dev).manual_seed(2)
    k_pool, v_pool = (torch.randn(2 * n, kv_heads, dim, device=dev, generator=g).to(torch.bfloat16) for _ in range(2))
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.arange(4096, dtype=torch.float32)[:, None] * inv_freq
    rope = RopeTable(torch.cat([angles.cos(), angles.sin()], -1).to(dev), dim, True)
    shifts = torch.zeros(n, dtype=torch.int64)
    shifts[100:2900] = torch.arange(100, 2900) // 512 * 512  # documents compiled at 0, read at their start
    positions = torch.arange(n - 48, n, device=dev)
    scored = (positions >= n - 40).float()

    def seq() -> ScoutSeq:
        return ScoutSeq(0, 48, positions, scored, None, torch.randperm(2 * n, device=dev, generator=torch.Generator(
            device=dev).manual_seed(3))[:n], torch.cat(rope.angles(shifts.to(dev)), -1), torch.tensor([n], dtype=torch.int32,
            device=dev), n, torch.zeros(kv_heads, n, device=dev))

    q = torch.randn(48, q_heads, dim, device=dev, generator=g).to(torch.bfloat16)
    got, want = seq(), seq()
    out = ScoutWrapper([(got, {0})]).forward(q, (k_pool, v_pool), causal=True, sm_scale=dim ** -0.5)
    expected = scout_layer_torch(q, k_pool, v_pool, want, True)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.mass, want.mass, atol=2e-2, rtol=2e-2)
    assert got.mass.sum() > 0


def test_decode_gets_its_turn_after_the_allowed_prefill_batches_in_a_row(monkeypatch):
    """`decode_turns` around SGLang's own `Scheduler.get_new_batch_prefill` (its body runs; the
    admission it calls forms a prefill batch every round, as a steady stream of link passes does)."""
    import inspect
    import pkgutil

    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.managers.scheduler import Scheduler as SGLangScheduler
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from epic_sglang.sglang_plugin import decode_turns

    assert pkgutil.resolve_name(decode_turns.TARGET) is SGLangScheduler.get_new_batch_prefill
    decoding, idle = ScheduleBatch(reqs=["running"]), ScheduleBatch(reqs=[])
    arrivals = iter(range(1000))
    scheduler = types.SimpleNamespace(prefill_delayer=None, chunked_req=None,
                                      _get_new_batch_prefill_raw=lambda prefill_delayer_single_pass, running_batch:
                                      (ScheduleBatch(reqs=[next(arrivals)]), running_batch))
    hook = decode_turns.yield_to_decode(2)

    own = inspect.unwrap(SGLangScheduler.get_new_batch_prefill)  # SGLang's body, without the installed hook

    def rounds(running, n: int) -> str:  # P: a prefill batch ran; D: the decode step's turn
        return "".join("D" if hook(own, scheduler, running).batch_to_run is None else "P" for _ in range(n))

    assert rounds(decoding, 7) == "PPDPPDP"
    assert rounds(idle, 4) == "PPPP"  # nothing decodes: prefill runs on
    scheduler.chunked_req = "cut"
    assert rounds(decoding, 3) == "PPP"  # a chunked prefill keeps its turn
    scheduler.chunked_req = None
    assert rounds(decoding, 1) == "D"
    scheduler._get_new_batch_prefill_raw = lambda prefill_delayer_single_pass, running_batch: (None, running_batch)
    assert rounds(decoding, 2) == "DD"  # no prefill formed: the streak starts over
    decoding.is_prefill_only = True
    scheduler._get_new_batch_prefill_raw = lambda prefill_delayer_single_pass, running_batch: (
        ScheduleBatch(reqs=[next(arrivals)]), running_batch)
    assert rounds(decoding, 3) == "PPP"  # prefill-only requests have no decode step to wait for
    decoding.is_prefill_only = False

    def mixed(prefill_delayer_single_pass, running_batch):  # `--enable-mixed-chunk`: the decode step rides along
        batch = ScheduleBatch(reqs=[next(arrivals)])
        batch.forward_mode = ForwardMode.MIXED
        return batch, running_batch

    scheduler.epic_prefill_streak = 0
    scheduler._get_new_batch_prefill_raw = mixed
    assert rounds(decoding, 5) == "PPPPP"


def test_max_consecutive_prefills_is_checked_when_the_plugin_loads(monkeypatch):
    from epic_sglang.sglang_plugin import decode_turns

    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv(decode_turns.VARIABLE, bad)
        with pytest.raises(ValueError, match="EPIC_SGLANG_MAX_CONSECUTIVE_PREFILLS must be a whole number"):
            hooks.install()
    monkeypatch.setenv(decode_turns.VARIABLE, "3")
    assert decode_turns.max_consecutive_prefills() == 3
    monkeypatch.setenv(decode_turns.VARIABLE, "0")
    assert decode_turns.max_consecutive_prefills() == 0  # SGLang's prefill-first rule
    monkeypatch.delenv(decode_turns.VARIABLE)
    assert decode_turns.max_consecutive_prefills() == 1  # the default: the load's measurement

    def hooked_targets() -> list[str]:  # what `install` registers with SGLang's hook registry
        targets = []
        monkeypatch.setattr(hooks.HookRegistry, "register", lambda target, hook, kind: targets.append(target))
        hooks.install()
        return targets

    assert decode_turns.TARGET in hooked_targets()  # by default the turn is taken
    monkeypatch.setenv(decode_turns.VARIABLE, "0")
    assert decode_turns.TARGET not in hooked_targets()  # SGLang's rule, untouched


def busy_scheduler_line(seconds: float) -> int:
    """A stand-in for the scheduler's own work: a Python loop that holds its thread."""
    spins, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        spins += 1
    return spins


def test_host_profile_samples_the_scheduler_thread_between_start_and_stop_profile(sglang_runtime, tmp_path):
    """/start_profile with activities ["HOST"] reaches SGLang's real profiler manager, whose
    hooked `_profile` samples the calling (scheduler) thread until the stop: the report names
    the function that held the thread; any other request is SGLang's own."""
    from sglang.srt.managers.io_struct import ProfileReq, ProfileReqType
    from sglang.srt.managers.scheduler_components.profiler_manager import SchedulerProfilerManager
    from sglang.srt.runtime_context import get_parallel

    manager = SchedulerProfilerManager(ps=get_parallel(), dp_tp_cpu_group=None, get_forward_ct=lambda: 0)
    stop = ProfileReq(req_type=ProfileReqType.STOP_PROFILE)
    assert not manager._profile(stop).success  # nothing sampling: SGLang's "not in progress"
    mixed = manager._profile(ProfileReq(activities=["HOST", "GPU"], output_dir=str(tmp_path)))
    assert not mixed.success and "runs alone" in mixed.message
    assert manager._profile(ProfileReq(activities=["HOST"], output_dir=str(tmp_path))).success
    assert "already sampling" in manager._profile(ProfileReq(activities=["HOST"])).message
    busy_scheduler_line(0.3)
    done = manager._profile(stop)
    assert done.success and str(tmp_path / "host-profile.txt") in done.message
    report = (tmp_path / "host-profile.txt").read_text()
    innermost = report.split("innermost Python line")[1].splitlines()[1]  # the line that held it most
    assert "busy_scheduler_line" in innermost and "tests/test_sglang_plugin.py" in innermost
    share = float(innermost.split("%")[0])
    assert share > 50, report
    folded = (tmp_path / "host-profile.folded").read_text().splitlines()
    assert any(line.split(" (")[0] != "busy_scheduler_line" and "busy_scheduler_line" in line for line in folded)
    sampled = float(report.split(": ")[1].split(" s sampled")[0])
    assert 0.3 <= sampled <= 2 and sum(int(line.rsplit(" ", 1)[1]) for line in folded) == pytest.approx(sampled * 1e6, abs=1e4)
    assert not manager._profile(stop).success  # the sampler is gone: SGLang's again


def test_prefill_graphs_replay_legolink_passes_and_leave_querylink_and_cacheblend_eager(sglang_runtime, monkeypatch,
                                                                                      capsys):
    """With EPIC_SGLANG_PREFILL_GRAPHS=1 SGLang starts its prefill graphs, and its real
    `can_run_graph` (hooked) lets a legolink pass replay them as a plain prefill does, SGLang's
    own limits kept; a pass whose layers differ (querylink's scout, CacheBlend's cut) runs
    eagerly. Off (the default), SGLang starts without them; a bad value stops the start."""
    from sglang.srt.model_executor.cuda_graph_config import Backend
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode
    from sglang.srt.model_executor.runner.prefill_cuda_graph_runner import PrefillCudaGraphRunner

    from epic_sglang.cli import main
    from epic_sglang.sglang_plugin import prefill_graphs
    from epic_sglang.sglang_plugin.launch import server_command

    runner = PrefillCudaGraphRunner.__new__(PrefillCudaGraphRunner)  # its capture needs a GPU: its state by hand
    runner.__dict__.update(_is_full_backend=False, prefill_backend_name=Backend.BREAKABLE, has_mha_companion_layers=False,
                           capture_hidden_mode=CaptureHiddenMode.NULL, capture_num_tokens=[16, 32, 64], max_num_tokens=64)
    s = Scheduler()
    ids, spans, _ = s.compiled_prompt(14)
    _, plan = s.prefill([s.request(ids, LinkHint("ns", tuple(spans), 2))])
    assert plan is not None and plan.shared is not None  # a legolink pass reading its documents in place

    def runs_graph(plan, tokens: int) -> bool:
        batch = types.SimpleNamespace(epic_plan=plan, input_ids=torch.zeros(tokens, dtype=torch.int64), input_embeds=None,
                                      replace_embeds=None, forward_mode=ForwardMode.EXTEND, batch_size=1,
                                      capture_hidden_mode=CaptureHiddenMode.NULL, global_num_tokens_cpu=None,
                                      return_logprob=False, extend_prefix_lens_cpu=[20])
        return PrefillCudaGraphRunner.can_run_graph(runner, batch)

    monkeypatch.setattr(prefill_graphs, "PASSES", Tally(prefill_graphs.PASSES.what))
    assert runs_graph(None, 30) and runs_graph(plan, 30)  # a plain prefill, a legolink pass
    assert not runs_graph(plan, 65)  # SGLang's own limit: past its largest captured size
    assert not runs_graph(dataclasses.replace(plan, scouts=[object()]), 30)  # querylink's scout still to run
    assert not runs_graph(dataclasses.replace(plan, blend=object()), 30)  # CacheBlend's cut
    assert prefill_graphs.PASSES.counts == {"graph": 1, "eager": 3}  # the server log's tally: link passes only

    assert "--disable-prefill-cuda-graph" in server_command("/m", 1, env={})
    assert "--disable-prefill-cuda-graph" not in server_command("/m", 1, env={prefill_graphs.VARIABLE: "1"})
    with pytest.raises(ValueError, match="EPIC_SGLANG_PREFILL_GRAPHS must be 0 .* or 1"):
        server_command("/m", 1, env={prefill_graphs.VARIABLE: "yes"})
    monkeypatch.setenv(prefill_graphs.VARIABLE, "yes")  # `serve --engine sglang` says so before it starts SGLang
    assert main(["serve", "--engine", "sglang"]) == 2
    assert "EPIC_SGLANG_PREFILL_GRAPHS must be 0 (link passes eager) or 1" in capsys.readouterr().err


def test_a_stalled_forward_logs_the_python_stack_it_is_stuck_in(sglang_runtime, caplog):
    """SGLang's watchdog, finding a forward stuck, calls `pyspy_dump_schedulers` (hooked in its
    module): the log then holds the stuck thread's Python stack down to the line it waits in,
    and not the watchdog's own."""
    import threading

    from sglang.srt.utils import watchdog

    entered, release = threading.Event(), threading.Event()

    def compiling_a_kernel() -> None:  # stands for the scheduler's forward, blocked in a C call
        entered.set()
        release.wait(10)

    stuck = threading.Thread(target=compiling_a_kernel, name="scheduler-stand-in")
    stuck.start()
    entered.wait(10)
    try:
        with caplog.at_level(logging.ERROR):
            watchdog.pyspy_dump_schedulers()
    finally:
        release.set()
        stuck.join()
    stacks = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("epic: Python stacks"))
    stuck_stack = stacks.split("Thread scheduler-stand-in:")[1].split("\nThread ")[0]
    assert "in compiling_a_kernel" in stuck_stack and "release.wait(10)" in stuck_stack
    assert "test_a_stalled_forward_logs_the_python_stack_it_is_stuck_in" not in stacks  # the caller's thread left out
