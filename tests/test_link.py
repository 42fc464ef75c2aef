"""Compile/link semantics: exactness limits, recomputed positions, reuse, immutability."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epic_sglang import Request, SamplingParams
from epic_sglang.policies import Segment


def run(engine, policy, docs, question="Who is mentioned first?", system=None, n=8, **kw):
    return engine.generate_batch([Request(question, docs, system, policy, SamplingParams(max_new_tokens=n),
                                          return_first_logits=True, **kw)])[0]


def doc_spans(engine, docs, system=None):
    """(start, length) of each document in the prompt, from the engine's own tokenization."""
    pos = len(engine.prompts.encode(engine.prompts.template_parts(system)[0]))
    spans = []
    for d in docs:
        n = len(engine.prompts.encode_document(d))
        spans.append((pos, n))
        pos += n
    return spans


def test_legolink_with_k_at_least_the_longest_document_equals_fr(engine, hotpot):
    docs = list(hotpot[0].paragraphs[:4])
    k = max(len(engine.prompts.encode_document(d)) for d in docs)
    fr = run(engine, "fr", docs, hotpot[0].question, n=16)
    lego = run(engine, f"legolink-{k}", docs, hotpot[0].question, n=16)
    assert lego.output_ids == fr.output_ids
    assert torch.equal(lego.first_logits, fr.first_logits)
    # the system prompt's exact KV comes from the prefix tree (fr published it); the rest is recomputed
    head = lego.stats.cached_prefix_tokens
    assert head == len(engine.prompts.encode(engine.prompts.template_parts(None)[0]))
    assert lego.stats.reused_tokens == 0 and lego.recomputed_positions == list(range(head, len(fr.prompt_ids)))


def test_recomputed_positions_of_every_policy(engine, hotpot):
    docs = list(hotpot[1].paragraphs[:3])
    spans = doc_spans(engine, docs)
    r = run(engine, "fr", docs, n=1, namespace="positions")  # a namespace of its own: no prefix hit yet
    n = len(r.prompt_ids)
    in_doc = {p for s, ln in spans for p in range(s, s + ln)}
    head = spans[0][0]  # from now on the system prompt's exact KV comes from the prefix tree
    text = sorted(set(range(head, n)) - in_doc)
    assert r.recomputed_positions == list(range(n)) and r.stats.cached_prefix_tokens == 0
    for policy in ("naive", "legolink0"):
        r = run(engine, policy, docs, n=1, namespace="positions")
        assert r.recomputed_positions == text and r.stats.reused_tokens == len(in_doc)
    for k in (1, 2, 16):
        r = run(engine, f"legolink-{k}", docs, n=1, namespace="positions")
        heads = [p for s, ln in spans for p in range(s, s + min(k, ln))]
        assert r.recomputed_positions == sorted(text + heads)
        assert r.stats.reused_tokens == len(in_doc) - len(heads)
    for share in (10, 30):  # querylink-p: the heads and the scout's picks, that share of the document tokens
        r = run(engine, f"querylink-p{share}-h2", docs, n=1, namespace="positions")
        recomputed_docs = set(r.recomputed_positions) & in_doc
        assert set(text) <= set(r.recomputed_positions) and len(recomputed_docs) == math.ceil(len(in_doc) * share / 100)
        assert {p for s, ln in spans for p in range(s, s + 2)} <= recomputed_docs
    for ratio in (5, 15):
        r = run(engine, f"cacheblend-{ratio}", docs, n=1, namespace="positions")
        text = sorted(set(range(n)) - in_doc)  # CacheBlend recomputes the prefix too
        picked = set(r.recomputed_positions) - set(text)
        assert set(text) <= set(r.recomputed_positions) and picked <= in_doc
        assert len(picked) == math.ceil(len(in_doc) * ratio / 100)


def test_naive_link_of_a_document_at_position_zero_equals_fr(engine, hotpot):
    """Cached KV reused at the position it was compiled at is the exact KV: checks the row,
    the slot mapping and RoPE applied at attention time."""
    doc = engine.prompts.encode_document(hotpot[2].paragraphs[0])
    tail = tuple(engine.prompts.encode("Question: who is this about?"))
    segs = [Segment(doc, document=0), Segment(tail)]
    out = {p: engine.generate_batch([Request(segments=segs, policy=p, sampling=SamplingParams(max_new_tokens=8),
                                             return_first_logits=True)])[0] for p in ("fr", "naive")}
    assert out["naive"].stats.reused_tokens == len(doc)
    assert out["naive"].output_ids == out["fr"].output_ids
    assert (out["naive"].first_logits - out["fr"].first_logits).abs().max() < 1e-3


def test_documents_compiled_earlier_link_like_fresh_ones(engine, hotpot):
    a, b, c = hotpot[3].paragraphs[:3]
    engine.flush_cache()
    run(engine, "legolink-4", [a, b], system="Earlier request.")  # compiles a and b
    warm = run(engine, "legolink-4", [b, c, a], system="Later request.")
    assert warm.stats.compiled_tokens == len(engine.prompts.encode_document(c))
    engine.flush_cache()
    fresh = run(engine, "legolink-4", [b, c, a], system="Later request.")
    assert fresh.stats.compiled_tokens == sum(len(engine.prompts.encode_document(d)) for d in (a, b, c))
    assert warm.output_ids == fresh.output_ids
    # Not bitwise: a document is compiled in one forward with the others missing beside it (a
    # and b, then a, b and c), and CPU GEMM kernels may block a row's sums by the forward's row
    # count (1e-4 apart on some CPUs); a misplaced or stale document would be far off.
    assert (warm.first_logits - fresh.first_logits).abs().max() < 1e-3


def test_same_document_twice_reordered_and_at_other_offsets(engine, hotpot):
    a, b = hotpot[4].paragraphs[:2]
    engine.flush_cache()
    first = run(engine, "legolink-8", [a, b, a], system="One.")
    assert first.stats.compiled_tokens == sum(len(engine.prompts.encode_document(d)) for d in (a, b))  # a once
    k = max(len(engine.prompts.encode_document(d)) for d in (a, b))
    assert run(engine, f"legolink-{k}", [a, b, a], n=8).output_ids == run(engine, "fr", [a, b, a], n=8).output_ids
    for docs, system in (([b, a], "Two."), ([a], "A much longer system prompt that moves every document further."), ([b, a, b], None)):
        r = run(engine, "legolink-8", docs, system=system)
        assert r.stats.compiled_tokens == 0
        assert r.stats.reused_tokens == sum(len(engine.prompts.encode_document(d)) - 8 for d in docs)
        assert len(r.output_ids) > 0


def test_a_linked_row_holds_each_documents_cached_slots_where_it_reuses_them(engine, hotpot):
    a, b = (p[:400] for p in hotpot[4].paragraphs[2:4])
    s = engine.admit(Request("Which one?", [a, b, a], "Row.", "legolink-4", SamplingParams(max_new_tokens=1)))
    try:
        engine.prefill([s])
        row = engine.req_to_token_pool.req_to_token[s.row, :s.plan.num_tokens].cpu()
        cached = torch.cat([d.value for d in s.documents]).cpu()
        for (start, length, _), doc in zip(s.plan.doc_spans, s.documents):
            reused = ~s.plan.recompute[start:start + length]
            assert reused.sum() == length - 4
            assert torch.equal(row[start:start + length][reused], doc.value.cpu()[reused])
        fresh = row[s.plan.recompute]
        assert fresh.unique().numel() == fresh.numel() and not torch.isin(fresh, cached).any()
    finally:
        engine.finish(s)


def shared_kv(engine):
    docs = sorted(engine.cache.document_nodes().items())
    slots = torch.cat([node.value for _, node in docs])
    return {key: node.value.clone() for key, node in docs}, [
        (engine.pool.get_key_buffer(i)[slots].clone(), engine.pool.get_value_buffer(i)[slots].clone())
        for i in range(engine.config.num_layers)]


POLICIES = ["naive", "legolink-1", "legolink-4", "legolink-16", "cacheblend-15", "cacheblend-50", "querylink-16",
            "querylink-24-h2-b4-s3", "querylink-p20-h2", "fr"]


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(data=st.data())
def test_shared_document_kv_is_never_modified_by_links(engine, hotpot, data):
    pool = [p[:300] for p in hotpot[5].paragraphs[:6]]
    if not hasattr(test_shared_document_kv_is_never_modified_by_links, "before"):
        engine.compile(pool, "legolink-16")
        test_shared_document_kv_is_never_modified_by_links.before = shared_kv(engine)
    docs = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=5))
    policy = data.draw(st.sampled_from(POLICIES))
    system = data.draw(st.sampled_from([None, "Short.", "You answer questions about documents carefully."]))
    r = run(engine, policy, docs, system=system, n=data.draw(st.integers(1, 3)))
    assert r.stats.compiled_tokens == 0 or policy == "fr"
    keys, kv = test_shared_document_kv_is_never_modified_by_links.before
    now_keys, now_kv = shared_kv(engine)
    assert now_keys.keys() == keys.keys() and all(torch.equal(keys[k], now_keys[k]) for k in keys)
    assert all(torch.equal(k0, k1) and torch.equal(v0, v1) for (k0, v0), (k1, v1) in zip(kv, now_kv))


def test_no_slot_leaks_after_requests(engine, hotpot):
    engine.flush_cache()
    free0 = engine.allocator.available_size()
    docs = list(hotpot[6].paragraphs[:3])
    engine.generate_batch([Request("q?", docs, None, p, SamplingParams(max_new_tokens=3)) for p in POLICIES + ["legolink0"]])
    cached = engine.cache.total_size()
    assert cached > 0 and engine.allocator.available_size() == free0 - cached
    assert engine.cache.protected_size() == 0  # nothing left locked
    engine.flush_cache()
    assert engine.allocator.available_size() == free0
