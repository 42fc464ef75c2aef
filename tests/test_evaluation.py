"""The accuracy harness: HotpotQA metrics and a smoke run (n = 5) through the engine."""
import math

from epic_sglang.evaluation import EvalRow, f1_difference, f1_exact, run_eval, summarize, token_agreement


def test_hotpotqa_answer_metrics():
    assert f1_exact("The Eiffel Tower.", "eiffel tower") == (1.0, 1.0)
    f1, em = f1_exact("in Paris, France", "Paris")
    assert em == 0.0 and math.isclose(f1, 2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert f1_exact("yes, they were", "yes") == (0.0, 0.0)  # yes/no must match exactly
    assert f1_exact("no", "no") == (1.0, 1.0)
    assert f1_exact("Berlin", "Paris") == (0.0, 0.0)


def test_token_agreement_counts_length_gaps_as_disagreement():
    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 9, 3]) == 0.5
    assert token_agreement([], []) == 1.0


def test_paired_f1_difference_with_bootstrap_interval():
    def row(qid: str, policy: str, f1: float) -> EvalRow:
        return EvalRow(qid, policy, "", "", f1, 0.0, 1.0, 1.0, 0.0, 1.0, 10)

    a = [row(f"q{i}", "fr", 1.0 if i % 2 else 0.5) for i in range(40)]
    b = [row(f"q{i}", "naive", 0.5) for i in range(40)] + [row("extra", "naive", 1.0)]  # unpaired: ignored
    n, diff, low, high = f1_difference(a + b, "fr", "naive")
    assert n == 40 and math.isclose(diff, 25.0) and 0 < low < diff < high < 50
    assert f1_difference(a, "fr", "fr") == (40, 0.0, 0.0, 0.0)
    assert f1_difference(a + [row("z", "other", 1.0)], "fr", "other") is None


def test_smoke_eval_of_four_policies_resumes(engine, tmp_path):
    out = tmp_path / "eval.jsonl"
    policies = ["fr", "naive", "legolink-16", "cacheblend-15"]
    rows = run_eval(engine, 5, policies, out, seed=0, progress=False)
    assert len(rows) == 20 and len(out.read_text().splitlines()) == 20
    s = summarize(rows)
    assert set(s) == set(policies) and all(v["n"] == 5 for v in s.values())
    assert s["fr"]["first_token_agree"] == 100 and s["fr"]["token_agree"] == 100 and s["fr"]["kl_first"] == 0
    assert s["fr"]["recompute_pct"] == 100 and s["naive"]["recompute_pct"] < s["legolink-16"]["recompute_pct"] < 100
    assert all(0 <= v["f1"] <= 100 and v["kl_first"] >= 0 for v in s.values())
    again = run_eval(engine, 5, policies, out, seed=0, progress=False)  # all cached: nothing recomputed
    assert len(out.read_text().splitlines()) == 20
    assert sorted((r.qid, r.policy, r.prediction) for r in again) == sorted((r.qid, r.policy, r.prediction) for r in rows)
