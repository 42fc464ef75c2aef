import re

import numpy as np
import pytest
import torch

from epic_sglang.link_plan import _largest_first, cacheblend_pick, plan_link, querylink_pick
from epic_sglang.policies import Segment, parse_policy


@pytest.mark.parametrize("text,name", [
    ("fr", "fr"), ("naive", "naive"), ("legolink", "legolink-16"), ("legolink-2", "legolink-2"),
    ("LegoLink-32", "legolink-32"), ("legolink0", "legolink0"), ("legolink-0", "legolink0"),
    ("cacheblend", "cacheblend-15"), ("cacheblend-5", "cacheblend-5"), ("cacheblend-100", "cacheblend-100"),
    ("querylink", "querylink-16"), ("QueryLink-24", "querylink-24"), ("querylink-2", "querylink-2"),
    ("querylink-16-h8-b1-s1", "querylink-16"), ("querylink-16-b4", "querylink-16-b4"),
    ("querylink-32-h0-b4-s2", "querylink-32-h0-b4-s2"), ("querylink-p12.5", "querylink-p12.5"),
    ("querylink-p15-h8-b2", "querylink-p15-b2"), ("querylink-p20-h2", "querylink-p20-h2"),
])
def test_parse_policy(text, name):
    assert parse_policy(text).name == name


@pytest.mark.parametrize("text,message", [
    ("bogus", "unknown policy"), ("legolink--1", "k must be >= 0"), ("cacheblend-0", "(0, 100]"),
    ("cacheblend-101", "(0, 100]"), ("cacheblend--5", "(0, 100]"), ("legolink-x", "unknown policy"),
    ("querylink-0", "k >= 1"), ("querylink-4-h5", "head <= k"), ("querylink-16-b0", "block >= 1"),
    ("querylink-16-s0", "stride >= 1"), ("querylink-16-s-1", "stride >= 1"), ("querylink-16-x2", "unknown policy"),
    ("querylink-p0", "(0, 100]"), ("querylink-p101", "(0, 100]"), ("querylink-p-5", "(0, 100]"),
    ("querylink-p", "unknown policy"), ("querylink-16-p10", "unknown policy"), ("querylink-p10-h-1", "head >= 0"),
])
def test_parse_policy_rejects(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_policy(text)


SEGMENTS = [Segment(tuple(range(5))), Segment(tuple(range(20)), 0), Segment(tuple(range(3)), 1),
            Segment(tuple(range(8)), 2), Segment(tuple(range(4)))]  # 5 + 20 + 3 + 8 + 4 = 40


def positions(plan):
    return plan.recompute.nonzero().flatten().tolist()


def test_plan_fr_recomputes_everything():
    plan = plan_link(parse_policy("fr"), SEGMENTS)
    assert positions(plan) == list(range(40)) and plan.doc_spans == []


@pytest.mark.parametrize("policy", ["naive", "legolink0"])
def test_plan_naive_recomputes_only_text(policy):
    plan = plan_link(parse_policy(policy), SEGMENTS)
    assert positions(plan) == [0, 1, 2, 3, 4, 36, 37, 38, 39]
    assert plan.doc_spans == [(5, 20, 1), (25, 3, 2), (28, 8, 3)]


def test_plan_legolink_recomputes_first_k_of_each_document():
    plan = plan_link(parse_policy("legolink-4"), SEGMENTS)
    assert positions(plan) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 25, 26, 27, 28, 29, 30, 31, 36, 37, 38, 39]
    assert int(plan.document_mask().sum()) == 31


def test_plan_recomputes_a_trailing_document_last_token():
    plan = plan_link(parse_policy("naive"), [Segment((1, 2)), Segment((3, 4, 5), 0)])
    assert positions(plan) == [0, 1, 4]


def test_cacheblend_pick_takes_ceil_ratio_of_largest():
    dev = torch.tensor([0.1, 5.0, 0.3, 9.0, 0.2, 0.0, 7.0])
    assert cacheblend_pick(dev, 15).tolist() == [3, 6]  # ceil(7 * 0.15) = 2
    assert cacheblend_pick(dev, 50).tolist() == [1, 2, 3, 6]
    assert cacheblend_pick(dev, 100).numel() == 7


def test_querylink_names_parse_back_to_the_same_policy():
    for text in ("querylink-16", "querylink-3", "querylink-16-h1-b8-s3", "querylink-9-h9", "querylink-p12.5-h3-s2"):
        assert parse_policy(parse_policy(text).name) == parse_policy(text)


def test_plan_querylink_recomputes_heads_and_budgets_legolink_k():
    plan = plan_link(parse_policy("querylink-8-h2"), SEGMENTS)
    assert positions(plan) == [0, 1, 2, 3, 4, 5, 6, 25, 26, 28, 29, 36, 37, 38, 39]
    assert plan.pick_budget == (8 + 3 + 8) - (2 + 2 + 2)  # legolink-8's document tokens less the heads


def test_plan_querylink_p_budgets_a_share_of_the_document_tokens_whatever_their_lengths():
    plan = plan_link(parse_policy("querylink-p50-h2"), SEGMENTS)  # documents of 20, 3 and 8 tokens
    assert positions(plan) == [0, 1, 2, 3, 4, 5, 6, 25, 26, 28, 29, 36, 37, 38, 39]  # the same heads
    assert plan.pick_budget == 16 - (2 + 2 + 2)  # ceil(50% of 31), less the heads
    assert plan_link(parse_policy("querylink-p10-h4"), SEGMENTS).pick_budget == 0  # the heads spend ceil(3.1) already
    long_docs = [Segment(tuple(range(512)), j) for j in range(4)] + [Segment((1, 2, 3))]
    assert plan_link(parse_policy("querylink-p12.5"), long_docs).pick_budget == \
        plan_link(parse_policy("querylink-64"), long_docs).pick_budget == 4 * (64 - 8)


def test_querylink_pick_takes_blocks_by_mass_and_spends_the_budget_exactly():
    plan = plan_link(parse_policy("querylink-8-h2"), SEGMENTS)  # budget 13; docs [5, 25) [25, 28) [28, 36)
    scores = torch.zeros(40)
    scores[[21, 22]] = 5.0  # block [21, 25) of the first document (blocks align to its start, 5)
    scores[33] = 3.0  # block [32, 36) of the third (its first block [28, 32) holds the head 28, 29)
    scores[10] = 1.0  # block [9, 13)
    scores[[0, 36]] = 100.0  # text, already recomputed: no block holds them
    picked = querylink_pick(scores, plan, block=4).tolist()
    blocks = set(range(21, 25)) | set(range(32, 36)) | set(range(9, 13))
    assert len(picked) == plan.pick_budget == 13 and blocks <= set(picked)  # three blocks by mass, then
    assert set(picked) - blocks == {7}  # the earliest of the zero blocks ([5, 9): 7, 8 free), cut to one token
    assert not plan.recompute[picked].any() and picked == sorted(picked)


def test_querylink_pick_with_a_budget_past_the_candidates_takes_them_all():
    plan = plan_link(parse_policy("querylink-30-h1"), SEGMENTS)
    picked = querylink_pick(torch.rand(40), plan, block=16)
    assert sorted(picked.tolist()) == [p for p in range(5, 36) if p not in (5, 25, 28)]


def test_largest_first_is_a_stable_descending_sorts_head():
    """The pick orders only the budget's worth of blocks: the `k` largest, ties in index order,
    exactly as a stable descending sort's first `k` (many ties: values from {0, 1, 2, 3})."""
    rng = np.random.default_rng(0)
    for size in (1, 7, 300):
        values = rng.integers(0, 4, size).astype(np.float64)
        for k in {1, size // 2, size - 1, size, size + 3} - {0}:
            assert _largest_first(values, k)[:k].tolist() == np.argsort(-values, kind="stable")[:k].tolist()
