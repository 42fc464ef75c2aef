import re

import pytest
import torch

from epic_sglang.policies import Segment, cacheblend_pick, parse_policy, plan_link


@pytest.mark.parametrize("text,name", [
    ("fr", "fr"), ("naive", "naive"), ("legolink", "legolink-16"), ("legolink-2", "legolink-2"),
    ("LegoLink-32", "legolink-32"), ("legolink0", "legolink0"), ("legolink-0", "legolink0"),
    ("cacheblend", "cacheblend-15"), ("cacheblend-5", "cacheblend-5"), ("cacheblend-100", "cacheblend-100"),
])
def test_parse_policy(text, name):
    assert parse_policy(text).name == name


@pytest.mark.parametrize("text,message", [
    ("bogus", "unknown policy"), ("legolink--1", "k must be >= 0"), ("cacheblend-0", "(0, 100]"),
    ("cacheblend-101", "(0, 100]"), ("cacheblend--5", "(0, 100]"), ("legolink-x", "unknown policy"),
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
