"""radix_ext on CPU with SGLang's real RadixCache: invariants under random operations,
locks, tiers, persistence, namespaces, KV events and the `epic` backend registration."""
from __future__ import annotations

import logging
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams

from epic_sglang import Engine, Request, SamplingParams
from epic_sglang.kv_pool import KVPool, SlotAllocator
from radix_ext import KVLayout, PICRadixCache, document_key

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
CPU = torch.device("cpu")


def make_cache(size: int = 64, host_bytes: int = 0, disk_dir=None, events: bool = False):
    pool = KVPool(size, LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_dim, LAYOUT.dtype, CPU)
    allocator = SlotAllocator(size, CPU)  # refuses double frees, unlike a plain free list
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                             page_size=1, enable_kv_cache_events=events)
    return PICRadixCache(params, pool, LAYOUT, "fp-test", host_cache_bytes=host_bytes, disk_dir=disk_dir), pool, allocator


def signature(doc: int, n: int) -> torch.Tensor:
    """Distinct KV per document and position, so a mixed-up slot shows."""
    return (doc * 100 + torch.arange(n, dtype=torch.float32)).view(n, 1, 1).expand(n, 1, 4).contiguous()


def compile_doc(cache, pool, doc: int, ids: tuple[int, ...]):
    key = document_key("fp-test", "plain", None, ids)
    node = cache.match_document(key, ids)
    if node is not None:
        return node
    slots = cache.alloc_slots(len(ids))
    if slots is None:
        return None
    for layer in range(LAYOUT.num_layers):
        pool.set_kv_buffer(layer, slots, signature(doc, len(ids)) + layer, -signature(doc, len(ids)))
    return cache.insert_document(key, ids, slots, namespace=None, recipe="plain")


def assert_doc_kv(pool, node, doc: int) -> None:
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(pool.k_buffer[layer][node.value], signature(doc, len(node.value)) + layer)
        assert torch.equal(pool.v_buffer[layer][node.value], -signature(doc, len(node.value)))


class Harness:
    """Requests at the cache level: lock documents and a matched prefix, hold private
    slots, then publish the prefix and release, as the engine does."""

    def __init__(self, cache, pool, allocator, docs):
        self.cache, self.pool, self.allocator, self.docs = cache, pool, allocator, docs
        self.active = []

    def start(self, doc_ids, prefix):
        nodes = []
        for d in doc_ids:
            node = compile_doc(self.cache, self.pool, d, self.docs[d])
            if node is None:
                break
            self.cache.inc_lock_ref(node)
            nodes.append((d, node))
        matched, pnode = self.cache.match_exact_prefix(prefix, None)
        self.cache.inc_lock_ref(pnode)
        private = self.cache.alloc_slots(len(prefix) - len(matched) + 2) if len(nodes) == len(doc_ids) else None
        request = dict(nodes=nodes, prefix=prefix, matched=matched, pnode=pnode, private=private)
        if private is None:
            self.end(request, publish=False)
            return
        self.active.append(request)

    def end(self, request, publish=True):
        private = request["private"]
        if private is not None:
            row = torch.cat([request["matched"], private[:len(request["prefix"]) - len(request["matched"])]])
            if publish and len(row):
                cached = self.cache.publish_exact_prefix(request["prefix"], row, None)
                private = private[~torch.isin(private, row[cached:])]
            self.allocator.free(private)
        self.cache.dec_lock_ref(request["pnode"])
        for _, node in request["nodes"]:
            self.cache.dec_lock_ref(node)

    def check(self):
        held = sum(len(r["private"]) for r in self.active)
        assert self.allocator.available_size() + self.cache.total_size() + held == self.allocator.size
        assert self.cache.evictable_size() + self.cache.protected_size() == self.cache.total_size()
        for r in self.active:
            for d, node in r["nodes"]:  # locked documents are never evicted nor overwritten
                assert self.cache.document_nodes()[document_key("fp-test", "plain", None, self.docs[d])] is node
                assert_doc_kv(self.pool, node, d)


DOCS = st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=9).map(tuple), min_size=1, max_size=8, unique=True)
OPS = st.lists(st.one_of(
    st.tuples(st.just("start"), st.lists(st.integers(0, 7), max_size=4),
              st.lists(st.integers(1, 6), max_size=6)),
    st.tuples(st.just("end"), st.integers(0, 20)),
    st.tuples(st.just("evict"), st.integers(1, 40)),
    st.tuples(st.just("flush")),
), max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(docs=DOCS, ops=OPS, host=st.booleans())
def test_random_operations_keep_locks_and_never_leak_or_double_free(docs, ops, host):
    cache, pool, allocator = make_cache(size=48, host_bytes=4096 if host else 0)
    h = Harness(cache, pool, allocator, docs)
    for op in ops:
        if op[0] == "start":
            h.start([d % len(docs) for d in op[1]], tuple(op[2]))
        elif op[0] == "end" and h.active:
            h.end(h.active.pop(op[1] % len(h.active)))
        elif op[0] == "evict":
            cache.evict(EvictParams(num_tokens=op[1]))
        elif op[0] == "flush":
            cache.flush()
        h.check()
    while h.active:
        h.end(h.active.pop())
    assert cache.protected_size() == 0
    cache.flush()
    assert allocator.available_size() == allocator.size and cache.total_size() == 0


def test_evicted_document_comes_back_from_host_memory_unchanged():
    cache, pool, allocator = make_cache(size=32, host_bytes=1 << 20)
    ids = tuple(range(1, 21))
    compile_doc(cache, pool, 3, ids)
    cache.evict(EvictParams(num_tokens=32))
    assert cache.document_nodes() == {} and cache.stats()["host_documents"] == 1
    node = compile_doc(cache, pool, 99, ids)  # a hit: the signature written is doc 3's, not 99's
    assert_doc_kv(pool, node, 3)
    assert cache.counters.host_hits == 1 and cache.counters.misses == 1  # the first compile


def test_kv_events_as_sglang_emits_them():
    cache, pool, _ = make_cache(events=True)
    assert [type(e).__name__ for e in cache.take_events()] == ["AllBlocksCleared"]  # the empty tree
    compile_doc(cache, pool, 1, (5, 6, 7))
    stored = cache.take_events()
    assert [type(e).__name__ for e in stored] == ["BlockStored"] * 3 and stored[0].token_ids == [5]
    cache.flush()
    assert [type(e).__name__ for e in cache.take_events()] == ["BlockRemoved"]


def test_epic_backend_registers_and_builds_on_sglang_pools(tmp_path, monkeypatch):
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext, create_tree_cache, registered_radix_cache_backends

    import radix_ext

    radix_ext.register()
    radix_ext.register()  # idempotent
    assert "epic" in registered_radix_cache_backends()
    kv = MHATokenToKVPool(size=64, page_size=1, dtype=torch.float32, head_num=1, head_dim=4, layer_num=2,
                          device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=ReqToTokenPool(4, 32, "cpu", False),
                             token_to_kv_pool_allocator=TokenToKVPoolAllocator(64, torch.float32, "cpu", kv, False),
                             page_size=1)
    monkeypatch.setenv("EPIC_SGLANG_KV_DIR", str(tmp_path))
    ctx = TreeCacheBuildContext(
        server_args=types.SimpleNamespace(radix_cache_backend="epic", enable_streaming_session=False),
        params=params, is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
        disable_radix_cache=False, effective_chunked_prefill_size=None, tp_worker=None,
        model_config=types.SimpleNamespace(model_path="/models/x"), tp_size=1, tp_rank=0, tp_group=None)
    cache = create_tree_cache(ctx)
    assert isinstance(cache, PICRadixCache) and cache.layout == LAYOUT
    ids = (4, 5, 6)
    key = document_key(cache.fingerprint, "plain", None, ids)
    slots = cache.alloc_slots(3)
    kv.k_buffer[1][slots] = 7.0
    cache.insert_document(key, ids, slots, namespace=None, recipe="plain")
    assert cache.disk.contains(key)  # queued at once, written by the writer thread
    cache.close()
    assert cache.stats()["disk_documents"] == 1
    cache.flush()
    assert cache.match_document(key, ids) is not None and cache.counters.disk_hits == 1
    assert bool((kv.k_buffer[1][cache.document_nodes()[key].value] == 7.0).all())


# ----------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def docs(hotpot):
    return [p for ex in hotpot[10:20] for p in ex.paragraphs][:60]


def ask(engine, docs, policy="legolink-16", namespace=None, system=None):
    return engine.generate_batch([Request("Which of these is oldest?", docs, system, policy,
                                          SamplingParams(max_new_tokens=6), return_first_logits=True,
                                          namespace=namespace)])[0]


def test_a_document_linked_by_100_requests_is_stored_once(docs):
    engine = Engine("smollm2-135m", device="cpu", kv_cache_gb=0.5, max_requests=100)
    free0 = engine.allocator.available_size()
    doc_tokens = len(engine.prompts.encode_document(docs[0]))
    requests = [Request(f"Question {i}?", [docs[0]], None, "legolink-16", SamplingParams(max_new_tokens=1))
                for i in range(100)]
    states = [engine.admit(r) for r in requests]
    try:
        engine.prefill(states)  # rows assembled, nothing linked yet
        private = sum(sum(p.numel() for p in s.private) for s in states)
        in_use = free0 - engine.allocator.available_size()
        assert in_use == doc_tokens + private  # one copy of the document + each request's private tokens
        assert sum(s.stats.compiled_tokens for s in states) == doc_tokens
        assert private == sum(int(s.plan.recompute.sum()) for s in states) and private < 100 * doc_tokens
        node = states[0].documents[0]
        assert all(s.documents[0] is node for s in states) and node.lock_ref == 100
    finally:
        for s in states:
            engine._release(s)
    assert engine.cache.protected_size() == 0
    engine.flush_cache()
    assert engine.allocator.available_size() == free0


def test_namespaces_never_share_documents_or_prefixes(engine, docs):
    engine.flush_cache()
    a = ask(engine, docs[:2], namespace="tenant-a", system="Tenant system prompt.")
    again = ask(engine, docs[:2], namespace="tenant-a", system="Tenant system prompt.")
    b = ask(engine, docs[:2], namespace="tenant-b", system="Tenant system prompt.")
    assert a.stats.compiled_tokens > 0 and again.stats.compiled_tokens == 0 and again.stats.cached_prefix_tokens > 0
    assert b.stats.compiled_tokens == a.stats.compiled_tokens and b.stats.cached_prefix_tokens == 0
    assert b.output_ids == a.output_ids  # same text, separately compiled, same answer
    assert len(engine.cache.document_nodes()) == 4


def test_restart_links_50_documents_from_disk_without_recompiling(tmp_path, docs, caplog):
    first = Engine("smollm2-135m", device="cpu", kv_dir=tmp_path, kv_cache_gb=0.5)
    assert first.compile(docs[:50]) > 0
    before = [ask(first, docs[i:i + 4]) for i in (0, 20, 46)]
    first.close()  # its queued disk writes finish (a process exit waits for them too)
    del first
    second = Engine("smollm2-135m", device="cpu", kv_dir=tmp_path, kv_cache_gb=0.5)  # the restart
    assert second.compile(docs[:50]) == 0 and second.cache.counters.disk_hits == 50
    after = [ask(second, docs[i:i + 4]) for i in (0, 20, 46)]
    for x, y in zip(before, after):
        assert x.output_ids == y.output_ids and torch.equal(x.first_logits, y.first_logits)
        assert y.stats.compiled_tokens == 0

    # a truncated, a tampered and a foreign file: each refused with a log line, recompiled, rewritten
    second.flush_cache()
    keys = [document_key(second.fingerprint, "plain", None, second.prompts.encode_document(d)) for d in docs[:3]]
    paths = [second.cache.disk.path(k) for k in keys]
    paths[0].write_bytes(paths[0].read_bytes()[:-100])
    raw = bytearray(paths[1].read_bytes())
    raw[-10] ^= 0xFF
    paths[1].write_bytes(bytes(raw))
    from radix_ext import DiskTier
    foreign = DiskTier(tmp_path, "another-model", second.cache.layout)
    entry = second.cache.disk.get(keys[2])
    foreign.put(keys[2], None, "plain", entry.token_ids, entry.k, entry.v)
    foreign.drain()
    with caplog.at_level(logging.WARNING, logger="radix_ext.tiers"):
        recompiled = second.compile(docs[:3])
    assert recompiled == sum(len(second.prompts.encode_document(d)) for d in docs[:3])
    assert second.cache.disk.refused == 3
    refused = [r.getMessage() for r in caplog.records if "refusing cached KV file" in r.getMessage()]
    assert len(refused) == 3 and any("another model" in m for m in refused)
    second.flush_cache()
    assert second.compile(docs[:3]) == 0  # rewritten files verify again
    redo = ask(second, docs[0:4])
    assert redo.output_ids == before[0].output_ids


@pytest.mark.parametrize("host_cache_gb", [0.0, 0.5])
def test_a_pool_smaller_than_the_working_set_keeps_answering_correctly(engine, docs, host_cache_gb):
    small = Engine("smollm2-135m", device="cpu", kv_cache_gb=0.0, host_cache_gb=host_cache_gb)  # 4,096 slots
    total = sum(len(small.prompts.encode_document(d)) for d in docs[:40])
    assert total > small.allocator.size  # the documents do not fit at once
    for i in range(0, 40, 4):
        ref = ask(engine, docs[i:i + 4])
        got = ask(small, docs[i:i + 4])
        assert got.output_ids == ref.output_ids
    for i in (0, 4, 8):  # the first ones were evicted: reloaded (host) or recompiled (no host)
        assert ask(small, docs[i:i + 4]).output_ids == ask(engine, docs[i:i + 4]).output_ids
    stats = small.cache.stats()
    assert stats["evicted_documents"] > 0
    assert (stats["host_hits"] > 0) == (host_cache_gb > 0)
    assert small.cache.protected_size() == 0
