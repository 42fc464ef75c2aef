"""Random and adversarial requests for every route (hypothesis strategies), shared by
tests/test_hardening.py and benchmarks/server_hardening.py.

A body is one of: well-formed with small odd values (policies, logprobs, regexes, samples,
streaming), well-formed but for one field holding anything (NaN and Infinity literals, lone
surrogates, huge and negative integers, booleans where numbers go, nesting, unknown keys), or
anything at all (garbage bytes). Valid ones ask for a few tokens, so they are quick to serve.
"""
from __future__ import annotations

import json

from hypothesis import strategies as st

SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.one_of(st.text(max_size=12), st.text(st.one_of(st.characters(), SURROGATE), min_size=1, max_size=6),
                 st.sampled_from(["hi", "What is PIC?", "", " ", "\u0000", "é" * 3]))
NUMBER = st.one_of(st.integers(-3, 4), st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),  # the engine flushes denormals
                   st.sampled_from([0.5, 1.0, 2.0, -1.0, 1e308, 2 ** 64, -(2 ** 63) - 1, 10 ** 30]))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
ANY = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)

# well-formed values, small and odd: what a valid request can still surprise the server with
SHORT = st.sampled_from(["hi", "What is PIC?", "Say 42.", "é ü 漢字", "a\nb", "  spaced  "])
V_SAMPLING = st.fixed_dictionaries({}, optional={
    "max_new_tokens": st.integers(0, 3), "min_new_tokens": st.integers(0, 1),
    "temperature": st.floats(0, 2, allow_subnormal=False), "top_p": st.floats(0.01, 1, allow_subnormal=False),
    "top_k": st.integers(-1, 5), "min_p": st.floats(0, 1, allow_subnormal=False), "seed": st.integers(0, 2 ** 63),
    "stop": st.one_of(SHORT, st.lists(SHORT, max_size=2)), "stop_token_ids": st.lists(st.integers(0, 50000), max_size=2),
    "ignore_eos": st.booleans(), "regex": st.sampled_from(["[0-9]+", "(yes|no)"]),
    "frequency_penalty": st.floats(-2, 2, allow_subnormal=False), "repetition_penalty": st.floats(0.5, 2, allow_subnormal=False),
    "n": st.integers(1, 2), "skip_special_tokens": st.booleans()})
V_POLICY = st.sampled_from(["fr", "naive", "legolink-2", "legolink0", "querylink-4", "querylink-8-h1-b2-s3", "cacheblend-50"])
V_HINTS = st.fixed_dictionaries({}, optional={"spans": st.sampled_from([[], [[0, 2]]]), "policy": V_POLICY,
                                              "namespace": st.sampled_from(["default", "ns-a"]), "transparent": st.booleans()})
V_GENERATE = st.fixed_dictionaries({"text": st.one_of(SHORT, st.lists(SHORT, min_size=1, max_size=2))}, optional={
    "sampling_params": V_SAMPLING, "stream": st.booleans(), "return_logprob": st.booleans(),
    "logprob_start_len": st.integers(-1, 2), "top_logprobs_num": st.integers(0, 3), "return_text_in_logprobs": st.booleans(),
    "kv_hints": V_HINTS})
V_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": SHORT}),
                      min_size=1, max_size=3)
V_CHAT = st.fixed_dictionaries({"messages": V_MESSAGES}, optional={
    "max_tokens": st.integers(0, 3), "temperature": st.floats(0, 2, allow_subnormal=False), "n": st.integers(1, 2),
    "stream": st.booleans(), "seed": st.integers(0, 10), "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
    "stop": SHORT, "documents": st.lists(st.one_of(SHORT, st.fixed_dictionaries({"text": SHORT})), max_size=2),
    "policy": V_POLICY, "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}])})
V_COMPLETION = st.fixed_dictionaries({"prompt": st.one_of(SHORT, st.lists(SHORT, min_size=1, max_size=2),
                                                          st.lists(st.integers(1, 40000), min_size=1, max_size=3))}, optional={
    "max_tokens": st.integers(0, 3), "logprobs": st.integers(0, 5), "echo": st.booleans(), "stream": st.booleans(),
    "policy": V_POLICY, "temperature": st.floats(0, 1, allow_subnormal=False), "n": st.integers(1, 2)})
V_RAG = st.fixed_dictionaries({"question": SHORT}, optional={
    "top_k": st.integers(1, 3), "policy": V_POLICY, "system": st.one_of(st.none(), SHORT), "stream": st.booleans(),
    "min_score": st.floats(-1, 1, allow_subnormal=False), "sampling_params": V_SAMPLING})
V_DOCUMENTS = st.fixed_dictionaries({"documents": st.lists(st.one_of(SHORT, st.fixed_dictionaries({"text": SHORT})),
                                                           min_size=1, max_size=2)},
                                    optional={"namespace": st.sampled_from(["default", "ns-a"]), "precompile": st.booleans()})
V_ABORT = st.one_of(st.fixed_dictionaries({"rid": SHORT}), st.just({"abort_all": True}))

VALID = {"/generate": V_GENERATE, "/v1/chat/completions": V_CHAT, "/v1/completions": V_COMPLETION, "/v1/rag": V_RAG,
         "/v1/documents": V_DOCUMENTS, "/abort_request": V_ABORT}
ROUTES = tuple(VALID)


@st.composite
def corrupted(draw, valid: st.SearchStrategy) -> dict:
    """A well-formed body with one field (or one sampling parameter) replaced by anything,
    or one unknown field added."""
    body = dict(draw(valid))
    target = body
    if isinstance(body.get("sampling_params"), dict) and draw(st.booleans()):
        target = body["sampling_params"] = dict(body["sampling_params"])
    key = draw(st.one_of(st.sampled_from(sorted(target)) if target else st.nothing(), TEXT))
    target[key] = draw(ANY)
    return body


def encode(body) -> bytes:
    """JSON as a careless client writes it: NaN / Infinity literals, surrogates escaped."""
    return json.dumps(body, allow_nan=True).encode()


def body_bytes(route: str) -> st.SearchStrategy[bytes]:
    """About half well-formed, a third well-formed but for one field, the rest anything."""
    valid, garbage = VALID[route].map(encode), st.one_of(
        ANY.map(encode), st.binary(max_size=40),
        st.sampled_from([b"", b"{", b"[]", b"null", b'{"a": NaN}', b"\xff\xfe", b'{"text": "\\ud800"}']))
    return st.one_of(valid, valid, valid, corrupted(VALID[route]).map(encode), corrupted(VALID[route]).map(encode), garbage)


# header values HTTP can carry (visible ASCII and obs-text bytes), non-UTF-8 ones included
HEADER_BYTE = st.one_of(st.integers(0x21, 0x7E), st.integers(0x80, 0xFF))
AUTHORIZATION = st.one_of(st.none(), st.lists(HEADER_BYTE, max_size=20).map(bytes),
                          st.lists(HEADER_BYTE, max_size=12).map(lambda b: b"Bearer " + bytes(b)),
                          st.sampled_from([b"Bearer", b"bearer k-user", b"Basic abc"]))
GET_PATHS = st.one_of(st.sampled_from(["/v1/documents", "/v1/models", "/get_model_info", "/get_server_info",
                                       "/health", "/metrics"]),
                      st.integers(-5, 2 ** 70).map(lambda i: f"/v1/documents/{i}"),
                      st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8).map(
                          lambda t: f"/v1/documents/{t}"),
                      st.tuples(st.integers(-5, 5000), st.integers(-5, 5)).map(
                          lambda t: f"/v1/documents?limit={t[0]}&offset={t[1]}"))
