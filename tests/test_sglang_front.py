"""The API in front of a SGLang server (`serve --engine sglang`), on CPU: everything that
happens before SGLang is asked (validation, documents, refusals), and what a client sees
when SGLang is down. A SGLang server itself needs CUDA; the GPU run covers the rest."""
from __future__ import annotations

import json

import pytest
import requests
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from epic_sglang.sampling import SamplingParams
from epic_sglang.server import ServerConfig, create_sglang_front
from epic_sglang.server.background import free_port, serve_in_thread
from epic_sglang.sglang_plugin.runtime import sglang_sampling


@pytest.fixture(scope="module")
def front(engine, tmp_path_factory):
    """The front over a SGLang address where nothing listens."""
    config = ServerConfig(model="smollm2-135m", store=tmp_path_factory.mktemp("store"))
    app = create_sglang_front(config, f"http://127.0.0.1:{free_port()}", engine.tokenizer, 8192)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def wiki(front, hotpot) -> list[int]:
    """Three HotpotQA paragraphs added through the front (a real store and FAISS index)."""
    r = requests.post(front + "/v1/documents", json={"documents": hotpot[0].paragraphs[:3], "namespace": "wiki"},
                      timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["ids"]


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, json=body, timeout=300)


def test_sampling_parameters_go_under_sglangs_names():
    params = SamplingParams(max_new_tokens=5, top_k=0, seed=7, stop=["\n"])
    out = sglang_sampling(params)
    assert out["top_k"] == -1 and out["sampling_seed"] == 7 and "seed" not in out
    assert out["max_new_tokens"] == 5 and out["stop"] == ["\n"] and "regex" not in out
    assert sglang_sampling(SamplingParams(top_k=20))["top_k"] == 20


def test_documents_and_rag_without_sglang_fail_clearly_and_lose_nothing(front, wiki, hotpot):
    r = post(front, "/v1/rag", {"question": hotpot[0].question, "namespace": "wiki", "top_k": 2})
    assert r.status_code == 503 and "SGLang server unreachable" in r.json()["error"]["message"]
    listed = requests.get(front + "/v1/documents", params={"namespace": "wiki"}, timeout=60).json()
    assert sorted(d["id"] for d in listed["documents"]) == sorted(wiki)
    r = post(front, "/v1/documents", {"documents": hotpot[1].paragraphs[:1], "namespace": "wiki", "precompile": True})
    assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]
    assert requests.get(front + "/health", timeout=60).json() == {"status": "ok"}
    r = requests.post(front + "/flush_cache", timeout=60)  # SGLang's own routes: a 503 naming it, too
    assert r.status_code == 503 and "SGLang server unreachable" in r.json()["error"]["message"]


@pytest.mark.parametrize("path, body, message", [
    ("/v1/rag", {"question": "Who?", "namespace": "wiki", "policy": "querylink-0"}, "querylink needs k >= 1"),
    ("/v1/rag", {"question": ""}, "question must be a non-empty string"),
    ("/generate", {"text": "Hi", "return_logprob": True, "logprob_start_len": 0, "kv_hints": {"policy": "cacheblend-0"}},
     "cacheblend ratio r must be in (0, 100]"),
    ("/generate", {"text": "Hi", "sampling_params": {"temperature": -1}}, "temperature must be >= 0"),
    ("/v1/chat/completions", {"model": "m", "messages": []}, "messages"),
])
def test_bad_requests_get_a_400_before_sglang_is_asked(front, wiki, path, body, message):
    r = post(front, path, body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_models_lists_the_context_length(front):
    models = requests.get(front + "/v1/models", timeout=60).json()
    assert models["data"][0]["max_model_len"] == 8192 and models["data"][0]["id"] == "smollm2-135m"


def test_sigterm_to_the_front_runs_its_stop(tmp_path):
    """uvicorn ends a SIGTERM'd process by raising the signal again (atexit handlers never
    run), so the SGLang server that `serve --engine sglang` started is stopped by the app's
    shutdown: the front process here is real, SIGTERM'd as a user or systemd would."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    marker, port = tmp_path / "stopped", free_port()
    script = f"""
import uvicorn
from pathlib import Path
from transformers import AutoTokenizer
from epic_sglang.models.loader import resolve_model_dir
from epic_sglang.server import ServerConfig, create_sglang_front
tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
app = create_sglang_front(ServerConfig(model="smollm2-135m"), "http://127.0.0.1:9", tokenizer, 8192,
                          stop=lambda: Path({str(marker)!r}).write_text("stopped"))
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning")
"""
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": root})
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None and time.time() < deadline, "the front did not start"
            try:
                requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert marker.read_text() == "stopped"


def sglang_stand_in(answer_ids: list[int], received: list[dict]):
    """A stand-in for a SGLang 0.5.16 server's /generate (its server needs CUDA): compile
    bodies get a JSON answer; a streamed request gets SGLang's SSE chunks, each with the text
    and meta_info so far (logprobs cumulative, as SGLang's tokenizer manager keeps them)."""
    app = FastAPI()

    @app.post("/flush_cache")
    async def flush_cache():
        received.append({"flush": True})
        return Response("Cache flushed.\n", media_type="text/plain")

    @app.get("/get_model_info")
    async def model_info():
        return {"model_path": "/models/stand-in", "is_generation": True}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        received.append(body)
        if not body.get("stream"):
            return JSONResponse({"text": "", "output_ids": [], "meta_info": {"cached_tokens": 0}})

        def chunks():
            for n in range(1, len(answer_ids) + 1):
                meta = {"cached_tokens": 40, "finish_reason": {"type": "length", "length": n} if n == len(answer_ids) else None}
                if body.get("logprob_start_len", -1) >= 0:  # SGLang: no logprob for a prompt's first token
                    prompt = body["input_ids"][body["logprob_start_len"]:]
                    meta["input_token_logprobs"] = [[None if i == 0 else -0.25 * i, t, None] for i, t in enumerate(prompt)]
                if body.get("return_logprob"):
                    meta["output_token_logprobs"] = [[-0.5 * i, t, f"t{t}"] for i, t in enumerate(answer_ids[:n])]
                    if body.get("top_logprobs_num"):
                        meta["output_top_logprobs"] = [[[-0.5 * i, t, f"t{t}"], [-9.0, 7, "t7"]] for i, t in enumerate(answer_ids[:n])]
                yield f"data: {json.dumps({'text': ' '.join(f't{t}' for t in answer_ids[:n]), 'output_ids': answer_ids[:n], 'meta_info': meta})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(chunks(), media_type="text/event-stream")
    return app


def test_a_chat_with_documents_compiles_them_once_links_them_and_returns_sglangs_logprobs(engine):
    """Also: SGLang's own routes through the front; a flush makes documents compile again."""
    received: list[dict] = []
    with serve_in_thread(sglang_stand_in([11, 12, 13], received)) as sglang_url:
        app = create_sglang_front(ServerConfig(model="smollm2-135m"), sglang_url, engine.tokenizer, 8192)
        with serve_in_thread(app) as url:
            body = {"model": "m", "messages": [{"role": "user", "content": "Which river?"}], "max_tokens": 3,
                    "documents": ["The Rhine flows north.", "The Danube flows east."], "policy": "legolink-4",
                    "logprobs": True, "top_logprobs": 2}
            first = post(url, "/v1/chat/completions", body).json()
            second = post(url, "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "Which?"}]}).json()
            info = requests.get(url + "/get_model_info", timeout=60)
            flushed = requests.post(url + "/flush_cache", timeout=60)
            third = post(url, "/v1/chat/completions", body).json()  # SGLang's cache is empty again
    assert info.json()["model_path"] == "/models/stand-in"
    assert flushed.status_code == 200 and flushed.text == "Cache flushed.\n" and {"flush": True} in received
    assert third["epic"]["compiled_tokens"] == first["epic"]["compiled_tokens"] > 0
    received = received[:received.index({"flush": True})]
    compiles = [b for b in received if not b.get("stream")]
    assert len(compiles) == 2 and all(b["sampling_params"] == {"max_new_tokens": 0} for b in compiles)
    linked = [b for b in received if b.get("stream")]
    assert len(linked) == 2 and all(b["return_logprob"] and b["top_logprobs_num"] == 2 for b in linked)
    assert all(b["extra_key"].startswith("epic:") for b in linked)  # the link hint
    doc_tokens = sum(len(b["input_ids"]) for b in compiles)
    assert first["epic"]["compiled_tokens"] == doc_tokens and second["epic"]["compiled_tokens"] == 0
    assert first["choices"][0]["message"]["content"] == "t11 t12 t13"
    content = first["choices"][0]["logprobs"]["content"]
    assert [(c["token"], c["logprob"]) for c in content] == [("t11", 0.0), ("t12", -0.5), ("t13", -1.0)]
    assert [t["token"] for t in content[2]["top_logprobs"]] == ["t13", "t7"]


def test_prompt_logprobs_go_as_fr_for_the_exact_prompt_and_come_back(engine):
    """The plugin does not link a prompt whose logprobs are asked for: the front sends it as
    fr (no link hint, nothing compiled, documents it knows stay known) and says so."""
    received: list[dict] = []
    # the stand-in reports 40 cached tokens: a prompt longer than that, a document whose planned reuse is less
    text = ("Context: " + "The Rhine flows north through Basel, Cologne and Rotterdam. " * 2
            + "Question: " + "which way does it flow, and through which cities? " * 3)
    span = [text.index("The Rhine"), text.index(" Question")]
    with serve_in_thread(sglang_stand_in([11, 12], received)) as sglang_url:
        app = create_sglang_front(ServerConfig(model="smollm2-135m"), sglang_url, engine.tokenizer, 8192)
        with serve_in_thread(app) as url:
            body = {"text": text, "sampling_params": {"max_new_tokens": 2}, "kv_hints": {"spans": [span]}}
            linked = post(url, "/generate", body).json()["meta_info"]
            scored = post(url, "/generate", {**body, "return_logprob": True, "logprob_start_len": 3}).json()["meta_info"]
            again = post(url, "/generate", body).json()["meta_info"]
    streamed = [b for b in received if b.get("stream")]
    assert len([b for b in received if not b.get("stream")]) == 1  # the document, compiled once
    assert linked["policy"] == again["policy"] == "legolink-16" and "extra_key" in streamed[0]
    assert scored["policy"] == "fr" and "extra_key" not in streamed[1] and streamed[1]["logprob_start_len"] == 3
    prompt = streamed[1]["input_ids"]
    assert [t for _, t, _ in scored["input_token_logprobs"]] == prompt[3:]
    assert scored["input_token_logprobs"][1][0] == -0.25
    assert [t for _, t, _ in scored["output_token_logprobs"]] == [11, 12]


def test_legolink0_compiles_documents_behind_the_engines_sinks_and_keeps_them_apart_from_plain_ones(engine):
    from epic_sglang.sglang_plugin.wire import decode

    received: list[dict] = []
    sinks = engine.prompts.sink_tokens(4)
    with serve_in_thread(sglang_stand_in([11], received)) as sglang_url:
        app = create_sglang_front(ServerConfig(model="smollm2-135m"), sglang_url, engine.tokenizer, 8192)
        with serve_in_thread(app) as url:
            body = {"model": "m", "messages": [{"role": "user", "content": "Which river?"}], "max_tokens": 1,
                    "documents": ["The Rhine flows north.", "The Danube flows east."]}
            for policy in ("legolink0", "legolink0", "legolink-4"):
                assert post(url, "/v1/chat/completions", {**body, "policy": policy}).status_code == 200
    compiles = [b for b in received if not b.get("stream")]
    docs = [tuple(engine.prompts.encode_document(d)) for d in body["documents"]]
    assert len(compiles) == 4  # each document once behind the sinks (reused the second time), once plain
    behind_sinks, plain = compiles[:2], compiles[2:]
    assert sorted(tuple(b["input_ids"][4:]) for b in behind_sinks) == sorted(docs)
    assert all(b["input_ids"][:4] == sinks and decode(b["extra_key"]).sink == 4 for b in behind_sinks)
    assert sorted(tuple(b["input_ids"]) for b in plain) == sorted(docs) and decode(plain[0]["extra_key"]).sink == 0
    hints = [decode(b["extra_key"]) for b in received if b.get("stream")]
    assert [(h.k, h.sink) for h in hints] == [(0, 4), (0, 4), (4, 0)]
