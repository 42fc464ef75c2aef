"""The link plan (`epic_sglang.link_plan`): the recompute rule shared by the engine, the SGLang
plugin and the client's reuse accounting; runs; attention entries (pure torch; CPU)."""
import random

import numpy as np
import torch

from epic_sglang.link_plan import (CascadeTuning, attention_entries, consecutive_runs, link_entries, plan_link,
                                   plan_spans, query_runs, querylink_stand_in, run_groups, run_query_starts,
                                   scout_queries, segment_spans, split_keys, wants_cascade, with_picks)
from epic_sglang.policies import Segment, parse_policy


def test_query_runs_split_scattered_link_queries():
    # prefix 0-3 + first token of doc at 10-11 + doc at 20-22 + question at 30
    assert query_runs([0, 1, 2, 3, 10, 11, 20, 21, 22, 30]) == [(4, 4), (6, 12), (9, 23), (10, 31)]
    assert query_runs(list(range(5))) == [(5, 5)]
    assert query_runs([7]) == [(1, 8)]


def test_auto_cascades_once_the_runs_key_prefixes_reach_the_threshold():
    # an 8K-token link of 16-token runs (62K run keys) stays per-run; a 16K one (255K) cascades
    short = [(16 * (i + 1), 512 * i + 16) for i in range(15)]
    long = [(16 * (i + 1), 512 * i + 16) for i in range(31)]
    tuning = CascadeTuning()
    assert not wants_cascade(short, tuning) and wants_cascade(long, tuning)
    assert wants_cascade([(1, tuning.auto_keys)], tuning) and not wants_cascade([(1, tuning.auto_keys - 1)], tuning)
    assert wants_cascade(short, CascadeTuning(auto_keys=1000))  # the threshold is the argument's


def visible_keys(bulk, local, positions):
    """Per query row, the keys its entries let it see (bulk: all of [k0, k1); local: causal,
    bottom-right aligned as FlashInfer does when kv is longer than the queries)."""
    seen = [[] for _ in positions]
    for q0, q1, k0, k1 in bulk:
        for row in range(q0, q1):
            seen[row] += range(k0, k1)
    for q0, q1, k0, k1 in local:
        for i, row in enumerate(range(q0, q1)):
            seen[row] += range(k0, k1 - (q1 - q0) + i + 1)
    return seen


def test_link_entries_give_every_query_exactly_the_keys_at_or_before_it():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        # a head run, then k-token runs at scattered starts, then a question run
        starts = sorted(torch.randperm(400, generator=g)[:int(torch.randint(1, 12, (1,), generator=g))].tolist())
        positions = sorted({p for s in starts for p in range(3 * s, 3 * s + int(torch.randint(1, 20, (1,), generator=g)))})
        runs = query_runs(positions)
        for page, group, chunk in [(1, None, 1), (16, None, 16), (16, 8, 16), (16, 40, 64), (1, 1, 1 << 20)]:
            bulk, local = link_entries(runs, page, group)
            bulk = split_keys(bulk, chunk)  # the cascade's bulk keys in several entries
            assert all(k0 % chunk == 0 and 0 < k1 - k0 <= chunk for _, _, k0, k1 in bulk)
            assert all(k0 % page == 0 for _, _, k0, _ in local)
            for row, keys in enumerate(visible_keys(bulk, local, positions)):
                assert sorted(keys) == list(range(positions[row] + 1)), (trial, page, group, row)
            assert len(local) == len(runs) and (group is not None or bulk == [])
            if group == 1 and page == 1:  # every run but one at position 0 has its own bulk entry
                assert len(bulk) == len(runs) - (positions[0] == 0)


def test_attention_entries_cut_bulk_keys_by_the_tuning():
    runs = query_runs(list(range(0, 4)) + list(range(100, 116)) + list(range(300, 316)) + list(range(600, 664)))
    bulk, local = attention_entries(runs, 16, CascadeTuning(group=20, chunk=32))
    assert all(k1 - k0 <= 32 for _, _, k0, k1 in bulk) and len(local) == len(runs)
    for row, keys in enumerate(visible_keys(bulk, local, [p for r in [range(0, 4), range(100, 116), range(300, 316),
                                                                      range(600, 664)] for p in r])):
        assert len(keys) == len(set(keys))
    assert attention_entries(runs, 16, CascadeTuning(group=20, chunk=1 << 20))[0] == link_entries(runs, 16, 20)[0]
    assert attention_entries(runs, 16, None) == link_entries(runs, 16, None)  # per-run entries, no bulk


def random_segments(rng: random.Random) -> list[Segment]:
    sizes = [rng.randint(0, 5)] + [rng.randint(1, 30) for _ in range(rng.randint(0, 4))] + [rng.randint(0, 6)]
    segs = [Segment(tuple(range(sizes[0])))] + [Segment(tuple(range(n)), document=j) for j, n in enumerate(sizes[1:-1])]
    return [s for s in segs + [Segment(tuple(range(sizes[-1])))] if len(s)] or [Segment((1,))]


def test_every_policy_recomputes_its_definition():
    """The table of `link_plan`, position by position, against each policy's plan."""
    rng = random.Random(0)
    for _ in range(300):
        segs = random_segments(rng)
        for name in ["fr", "naive", "legolink0", "legolink-1", "legolink-4", "cacheblend-15", "querylink-6-h2"]:
            policy = parse_policy(name)
            plan = plan_link(policy, segs)
            head = {"legolink": policy.k, "querylink": policy.head}.get(policy.kind, 0)
            expected = [policy.kind == "fr" or seg.document is None or t < head for seg in segs for t in range(len(seg))]
            expected[-1] = True
            assert plan.recompute.tolist() == expected, (name, segs)
            reused = sum(not e for e in expected)
            # cacheblend recomputes ceil(15%) of the document tokens more, picked at its check layer;
            picks = -(-sum(len(s) for s in segs if s.document is not None) * 15 // 100) if policy.kind == "cacheblend" else 0
            picks += plan.pick_budget  # querylink's, picked by its scout
            assert plan.reused_tokens == max(reused - picks, 0)
            assert sum(length for _, length, _, _ in plan.reused_runs()) == reused
            if policy.kind == "querylink":  # legolink-k's first-k document tokens, less those recomputed
                first_k = sum(min(policy.k, len(s)) for s in segs if s.document is not None)
                assert plan.pick_budget == first_k - int((plan.document_mask() & plan.recompute).sum())
                # before its scout a runtime plans the row with stand-ins: as many, legolink-k's tokens
                stand_ins = querylink_stand_in(plan)
                legolink = plan_link(parse_policy(f"legolink-{policy.k}"), segs).recompute
                assert len(stand_ins) == plan.pick_budget
                if segs[-1].document is None:  # else legolink-k recomputes the last token beyond its k
                    assert torch.equal(with_picks(plan, stand_ins).recompute, legolink)


def test_run_groups_give_each_query_every_run_before_it_once_and_each_document_one_rotation():
    rng = random.Random(5)
    for _ in range(200):
        plan = plan_spans(120, [(4, 30, 0), (40, 12, 1), (60, 50, 2)], rng.randint(0, 3))
        picks = rng.sample([p for p in range(120) if not plan.recompute[p]], rng.randint(0, 20))
        plan.recompute[picks] = True  # querylink's picks cut the documents into runs
        runs = plan.reused_runs()
        queries = plan.recompute.nonzero().flatten().tolist()
        starts = run_query_starts([(r[0], r[1]) for r in runs], queries)
        first, end, q0, q1 = run_groups([r[2] for r in runs], starts, len(queries))
        read = [[] for _ in queries]
        for a, b, x, y in zip(first.tolist(), end.tolist(), q0.tolist(), q1.tolist()):
            assert len({runs[i][2] for i in range(a, b)}) == 1 and x < y  # one document, someone reads it
            for j in range(x, y):
                read[j] += range(a, b)
        for j, p in enumerate(queries):  # exactly the runs before the query, each once
            assert sorted(read[j]) == [i for i, r in enumerate(runs) if r[0] + r[1] <= p]
        rotated = sum(y - x for x, y in zip(q0.tolist(), q1.tolist()))
        docs = sorted({r[2] for r in runs})  # a query is rotated once per document before it
        assert rotated == sum(len(queries) - min(s for s, r in zip(starts, runs) if r[2] == d) for d in docs)
    assert [a.tolist() for a in run_groups([0, 0, 1], [0, 0, 0], 1)] == [[0, 2], [2, 3], [0, 0], [1, 1]]  # decode
    assert all(a.size == 0 for a in run_groups([], [], 3))


def test_reused_runs_are_maximal_and_name_their_document_offset():
    segs = [Segment((1, 2)), Segment(tuple(range(10)), document=0), Segment((3,)), Segment(tuple(range(6)), document=1)]
    plan = plan_link(parse_policy("legolink-4"), segs)
    assert plan.reused_runs() == [(6, 6, 1, 4), (17, 1, 3, 4)]  # the prompt's last token is recomputed
    plan.recompute[8] = True  # a pick inside the first document splits its run
    assert plan.reused_runs() == [(6, 2, 1, 4), (9, 3, 1, 7), (17, 1, 3, 4)]
    assert segment_spans(segs) == [(2, 10, 1), (13, 6, 3)]
    assert plan_spans(19, [(2, 10, 0)], 4).reused_runs() == [(6, 6, 0, 4)]  # a document not cached is text


def test_consecutive_runs_are_the_maximal_runs_of_any_sorted_set():
    rng = random.Random(0)
    assert consecutive_runs([]) == [] and consecutive_runs(np.zeros(0, dtype=np.int64)) == []
    for _ in range(200):
        values = sorted(rng.sample(range(60), rng.randrange(1, 40)))
        runs = consecutive_runs(values)
        assert [x for a, b in runs for x in range(a, b)] == values  # every value once, in order
        assert all(b1 < a2 for (_, b1), (a2, _) in zip(runs, runs[1:]))  # maximal: a gap between runs
        assert consecutive_runs(np.asarray(values)) == runs



def test_the_scout_computes_the_text_outside_documents_and_the_last_token_and_scores_the_question():
    """`scout_queries`: of the computed positions, those outside the documents and the prompt's
    last (even inside a document); scored, those after the last document, or the last alone."""
    segs = [Segment((1, 2)), Segment(tuple(range(6)), document=0), Segment((7,)),
            Segment(tuple(range(5)), document=1), Segment((8, 9, 10))]
    plan = plan_link(parse_policy("querylink-6-h2"), segs)  # heads 2..3 and 9..10 computed too
    computed = plan.recompute.nonzero().flatten().numpy()
    scouted, scored = scout_queries(plan, computed)
    assert computed[scouted].tolist() == [0, 1, 8, 14, 15, 16] and scored.tolist() == [False] * 3 + [True] * 3
    ends_in_a_document = segs[:4]  # no question: the last token (inside the document) alone is scored
    plan = plan_link(parse_policy("querylink-6-h2"), ends_in_a_document)
    computed = plan.recompute.nonzero().flatten().numpy()
    scouted, scored = scout_queries(plan, computed)
    assert computed[scouted].tolist() == [0, 1, 8, 13] and scored.tolist() == [False, False, False, True]
