"""The accuracy harness: HotpotQA metrics and a smoke run (n = 5) through the engine."""
import math

import pytest

from epic_sglang.data.needle import needle_examples, recovered
from epic_sglang.evaluation import (EvalRow, f1_difference, f1_exact, fidelity_gate, run_eval, sample_questions,
                                    summarize, token_agreement, TASKS)


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
    rows = run_eval(engine, sample_questions(5, 0), policies, out, progress=False, batch_requests=8)  # 2 per batch
    assert len(rows) == 20 and len(out.read_text().splitlines()) == 20
    s = summarize(rows)
    assert set(s) == set(policies) and all(v["n"] == 5 for v in s.values())
    assert s["fr"]["first_token_agree"] == 100 and s["fr"]["token_agree"] == 100 and s["fr"]["kl_first"] == 0
    assert s["fr"]["recompute_pct"] == 100 and s["naive"]["recompute_pct"] < s["legolink-16"]["recompute_pct"] < 100
    assert all(0 <= v["f1"] <= 100 and v["kl_first"] >= 0 for v in s.values())
    again = run_eval(engine, sample_questions(5, 0), policies, out, progress=False)  # all cached: nothing recomputed
    assert len(out.read_text().splitlines()) == 20
    assert sorted((r.qid, r.policy, r.prediction) for r in again) == sorted((r.qid, r.policy, r.prediction) for r in rows)


def test_a_sample_larger_than_the_data_is_refused_with_what_to_do(monkeypatch):
    from epic_sglang import evaluation

    few = evaluation.load_hotpotqa()[:10]  # as a data file packed with --n 10 --seed 0
    monkeypatch.setattr(evaluation, "load_hotpotqa", lambda: few)
    monkeypatch.setattr(evaluation, "packed_seed", lambda: 0)
    assert len(sample_questions(10, 0)) == 10
    with pytest.raises(ValueError, match=r"holds 10 questions, fewer than n = 1500.*--n 1500"):
        sample_questions(1500, 0)
    with pytest.raises(ValueError, match=r"packed for seed 0, not 1.*--seed 1"):  # another seed's sample
        sample_questions(5, 1)


def test_packed_data_gives_the_same_sample_and_names_its_seed(tmp_path, monkeypatch):
    import json

    from epic_sglang.data import hotpotqa
    from epic_sglang.data.pack import pack

    data = pack(tmp_path, 30, 2)
    assert json.loads((data / "hotpotqa.sample.json").read_text()) == {"n": 30, "seed": 2}
    expected = [q.id for q in sample_questions(30, 2)]
    monkeypatch.setattr(hotpotqa, "long_context_eval_file", lambda name: data / name)
    hotpotqa.load_hotpotqa.cache_clear()
    try:
        assert hotpotqa.packed_seed() == 2 and [q.id for q in sample_questions(30, 2)] == expected
        assert [q.id for q in sample_questions(12, 2)] == expected[:12]
    finally:
        hotpotqa.load_hotpotqa.cache_clear()


def test_a_larger_sample_extends_a_smaller_one():
    small, large = sample_questions(20, 3), sample_questions(60, 3)
    assert [q.id for q in large[:20]] == [q.id for q in small] and len({q.id for q in large}) == 60
    assert [q.id for q in sample_questions(20, 4)] != [q.id for q in small]


def test_needle_examples_hide_one_needle_in_512_token_documents(engine):
    examples = needle_examples(engine.tokenizer, [1024, 2048], depth_count=10, repeats=1, seed=0)
    assert len(examples) == 20
    for ex in examples:
        holding = [i for i, d in enumerate(ex.documents) if ex.answer in d]
        assert len(ex.documents) == ex.length // 512 and len(holding) == 1
        assert holding[0] == round(ex.depth * (len(ex.documents) - 1))  # depth 0: first document, 1: last
        assert all(len(engine.tokenizer.encode(d)) <= 512 + 40 for d in ex.documents)  # the needle adds ~25
        assert ex.question.endswith("mentioned in the provided text?") and ex.answer.isdigit()
    assert recovered(f"The number is {examples[0].answer}.", examples[0].answer) == (1.0, 1.0)
    assert recovered("I do not know.", examples[0].answer) == (0.0, 0.0)


def test_fidelity_gate_verdicts():
    def rows(policy, f1s):
        return [EvalRow(f"q{i}", policy, "", "", f, 0.0, 1.0, 1.0, 0.0, 1.0, 10) for i, f in enumerate(f1s)]
    fr = rows("fr", [1.0, 0.0] * 100)
    same = rows("querylink-16", [1.0, 0.0] * 100)  # identical answers: difference 0, interval [0, 0]
    worse = rows("naive", [0.0, 0.0] * 100)  # 50 points below
    noisy = rows("legolink-16", [0.0, 1.0] * 100)  # 0 on average, every answer different: wide interval
    verdicts = {v.policy: v for v in fidelity_gate(fr + same + worse + noisy, margin=2.0)}
    assert set(verdicts) == {"querylink-16", "naive", "legolink-16"}
    assert verdicts["querylink-16"].verdict == "pass" and verdicts["querylink-16"].difference == 0
    assert verdicts["naive"].verdict == "fail" and verdicts["naive"].high < -2
    assert verdicts["legolink-16"].verdict == "inconclusive" and verdicts["legolink-16"].low < -2 < verdicts["legolink-16"].high
    assert "PASS" in verdicts["querylink-16"].line(2.0) and "run more questions" in verdicts["legolink-16"].line(2.0)


def test_tasks_name_their_scoring():
    assert TASKS["hotpotqa"].score is f1_exact and TASKS["needle"].score is recovered


def test_eval_cli_prints_a_verdict_per_policy_and_refuses_bad_input(tmp_path):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "epic_sglang.cli", "eval", "--model", "smollm2-135m", "--device", "cpu",
                               "--out", str(tmp_path / "gate.jsonl"), *args], capture_output=True, text=True, timeout=900)
    r = cli("--n", "2", "--policies", "naive,legolink-16")
    lines = [line for line in r.stdout.splitlines() if " vs fr " in line]
    assert [line.split(":")[0] for line in lines] == ["legolink-16", "naive"], r.stdout + r.stderr
    assert all(("PASS" in line) or ("FAIL" in line) or ("INCONCLUSIVE" in line) for line in lines)
    assert r.returncode == (0 if all("PASS" in line for line in lines) else 1)
    bad = cli("--policies", "legolink-x")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown policy" in bad.stderr
    assert cli("--n", "0").returncode == 2
