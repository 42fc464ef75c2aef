"""SGLang's sampling params and logprobs through the engine."""
from __future__ import annotations

import re

import pytest
import torch

from epic_sglang.engine import Request
from epic_sglang.policies import Segment
from epic_sglang.sampling import SamplingParams, sample_next

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"


def run(engine, **kw):
    logprobs = {k: kw.pop(k) for k in ("return_logprob", "logprob_start_len", "top_logprobs_num",
                                       "return_text_in_logprobs") if k in kw}
    ids = engine.tokenizer.encode(PROMPT)
    return engine.generate_batch([Request(segments=[Segment(tuple(ids))], policy="fr",
                                          sampling=SamplingParams(**kw), **logprobs)])[0]


def test_prompt_and_output_logprobs_match_transformers(engine, hf_model):
    out = run(engine, max_new_tokens=4, return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
              return_text_in_logprobs=True)
    ids = torch.tensor([out.prompt_ids + out.output_ids])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0].float(), -1)
    n = len(out.prompt_ids)
    expect_in = [None] + [float(logp[i - 1, t]) for i, t in enumerate(out.prompt_ids) if i]
    assert out.input_token_logprobs[0][0] is None
    assert [t for _, t, _ in out.input_token_logprobs] == out.prompt_ids
    for (got, _, _), want in zip(out.input_token_logprobs[1:], expect_in[1:]):
        assert abs(got - want) < 1e-3
    for j, (got, tok, text) in enumerate(out.output_token_logprobs):
        assert tok == out.output_ids[j] and abs(got - float(logp[n - 1 + j, tok])) < 1e-3
        assert text == engine.tokenizer.decode([tok])
        top = out.output_top_logprobs[j]
        assert len(top) == 3 and top[0][1] == int(logp[n - 1 + j].argmax())
    tail = run(engine, max_new_tokens=1, return_logprob=True, logprob_start_len=n - 3)
    assert [t for _, t, _ in tail.input_token_logprobs] == out.prompt_ids[-3:]


def test_prefill_only_request_returns_no_tokens(engine):
    out = run(engine, max_new_tokens=0)
    assert out.output_ids == [] and out.text == "" and out.finish_reason == {"type": "length", "length": 0}


def test_penalties_min_tokens_and_stop_regex(engine):
    plain = run(engine, max_new_tokens=16, ignore_eos=True)
    repeated = max(plain.output_ids, key=plain.output_ids.count)
    assert plain.output_ids.count(repeated) > 1  # the prompt invites repetition
    penalized = run(engine, max_new_tokens=16, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    assert max(penalized.output_ids.count(t) for t in set(penalized.output_ids)) < plain.output_ids.count(repeated)
    first = plain.output_ids[0]
    held = run(engine, max_new_tokens=3, min_new_tokens=3, stop_token_ids=[first])
    assert first not in held.output_ids and len(held.output_ids) == 3
    word = re.findall(r"[a-z]+", plain.text)[1]
    cut = run(engine, max_new_tokens=16, ignore_eos=True, stop_regex=[rf"\b{word}\b"])
    assert cut.text == plain.text[:plain.text.find(word)] and cut.finish_reason["matched"] == word
    kept = run(engine, max_new_tokens=16, ignore_eos=True, stop_regex=[rf"\b{word}\b"], no_stop_trim=True)
    assert kept.text.endswith(word)


def test_constrained_decoding_follows_regex_and_json_schema(engine):
    out = run(engine, max_new_tokens=12, regex=r"(cat|dog) [0-9]{2}")
    assert re.fullmatch(r"(cat|dog) [0-9]{2}", out.text)
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}'
    out = run(engine, max_new_tokens=24, json_schema=schema)
    import json

    assert isinstance(json.loads(out.text)["n"], int)


@pytest.mark.parametrize("params,message", [
    (dict(bogus=1), "unknown sampling_params key 'bogus'"),
    (dict(top_k=-5), "top_k"),
    (dict(stop_regex=["("]), "bad stop_regex"),
    (dict(regex="a", json_schema="{}"), "not both"),
    (dict(max_new_tokens="ten"), "max_new_tokens must be an integer"),
    (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_from_dict_rejects_bad_params(params, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams.from_dict(params)


def test_from_dict_takes_sglang_frontend_defaults():
    p = SamplingParams.from_dict({"max_new_tokens": 8, "stop": (), "stop_regex": (), "top_k": -1, "regex": None,
                                  "json_schema": None, "n": None, "spaces_between_special_tokens": True})
    assert (p.max_new_tokens, p.top_k, p.stop, p.regex) == (8, -1, [], None)


def test_a_tiny_temperature_samples_greedily_instead_of_overflowing():
    """1e-300 scales the logits past float range (the fuzz found it: multinomial on NaN)."""
    logits = torch.tensor([1.0, 3.0, 2.0, -5.0])
    for t in (1e-300, 1e-7):
        p = SamplingParams.from_dict({"temperature": t, "seed": 1})
        assert p.greedy and p.generator() is None and sample_next(logits, p, None) == 1
    assert not SamplingParams.from_dict({"temperature": 1e-5}).greedy
