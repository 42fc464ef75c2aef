"""End to end: the real server (uvicorn on loopback) with SmolLM2, driven by SGLang's frontend
(`sgl.RuntimeEndpoint`), the official `openai` client, and plain HTTP."""
from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from epic_sglang.server import ServerConfig, create_app
from epic_sglang.server.background import free_port, serve_in_thread

KEY, ADMIN = "test-key", "admin-key"
AUTH, ADMIN_AUTH = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {ADMIN}"}
SYSTEM_A, SYSTEM_B = "Answer from the documents.", "You are a terse assistant. Use the documents."


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    config = ServerConfig(model="smollm2-135m", store=tmp_path_factory.mktemp("store"), api_key=KEY,
                          admin_api_key=ADMIN, max_running=16)
    with serve_in_thread(create_app(config, engine=engine)) as url:
        yield url


@pytest.fixture(scope="module")
def corpus(server, hotpot):
    """Six HotpotQA paragraphs ingested through the API."""
    paragraphs = [p for ex in hotpot[:3] for p in ex.paragraphs[:2]]
    r = requests.post(f"{server}/v1/documents", json={"documents": paragraphs}, headers=ADMIN_AUTH, timeout=300)
    assert r.status_code == 200, r.text
    assert len(r.json()["ids"]) == len(paragraphs)
    return dict(zip(r.json()["ids"], paragraphs))


def post(server, path, body, headers=AUTH, **kw):
    return requests.post(f"{server}{path}", json=body, headers=headers, timeout=300, **kw)


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            payload = line[6:].decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def kv_clean(server) -> dict:
    """The pool after every request finished: nothing private, nothing locked, no rows held."""
    deadline = time.time() + 30
    while True:
        info = requests.get(f"{server}/server_info", headers=AUTH, timeout=60).json()
        kv = info["kv"]
        if (kv["private"], kv["locked"], kv["request_rows_in_use"], info["running"]) == (0, 0, 0, 0) \
                or time.time() > deadline:
            return info


def test_sglang_frontend_program(server):
    import sglang as sgl

    backend = sgl.RuntimeEndpoint(server, api_key=KEY)

    @sgl.function
    def program(s, question):
        s += "Q: " + question + "\n"
        s += "A:" + sgl.gen("answer", max_tokens=8, stop="\n", temperature=0)
        s += "\nIs that right? " + sgl.select("verdict", choices=["yes", "no"])
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"\nHint {i}:" + sgl.gen("hint", max_tokens=5, temperature=0)
        forks.join()
        s += "\nNumber: " + sgl.gen("number", max_tokens=4, regex=r"[0-9]+", temperature=0)

    state = program.run(question="What is 2+2?", backend=backend)
    assert state["answer"].strip() and "\n" not in state["answer"]
    assert state["verdict"] in ("yes", "no")
    assert re.fullmatch(r"[0-9]+", state["number"])
    assert state.text().startswith("Q: What is 2+2?\nA:" + state["answer"])

    streamed = program.run(question="What is 2+2?", backend=backend, stream=True)
    text = "".join(streamed.text_iter())
    assert text == state.text()  # greedy: streaming gives the same program text


def test_frontend_program_marks_documents_with_the_lang_helper(server, hotpot):
    import sglang as sgl

    from epic_sglang.lang import EpicEndpoint, document

    backend = EpicEndpoint(server, api_key=KEY, policy="legolink-16")
    ex = hotpot[9]

    @sgl.function
    def rag(s, system):
        s += system + "\n" + "".join(document(d) for d in ex.paragraphs[:3])
        s += "Question: " + ex.question + "\nAnswer:" + sgl.gen("answer", max_tokens=4, temperature=0)

    first = rag.run(system=SYSTEM_A, backend=backend).get_meta_info("answer")
    second = rag.run(system=SYSTEM_B, backend=backend).get_meta_info("answer")
    assert first["compiled_tokens"] > 0 and second["compiled_tokens"] == 0
    assert second["reused_tokens"] == first["compiled_tokens"] - 3 * 16  # legolink-16 recomputes 16 per document


def test_examples_run_against_the_server(server):
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent / "examples"
    runs = [[sys.executable, root / "openai_client.py", "--url", f"{server}/v1", "--api-key", KEY],
            [sys.executable, root / "sglang_rag_program.py", "--url", server, "--api-key", KEY]]
    if shutil.which("curl"):
        runs.append(["bash", root / "curl.sh"])
    env = {**os.environ, "URL": server, "API_KEY": KEY, "ADMIN_KEY": ADMIN}
    for cmd in runs:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-2000:])
        assert out.stdout.strip()
    reused = re.findall(r"reused=(\d+)", subprocess.run(runs[1], capture_output=True, text=True, env=env).stdout)
    assert len(reused) == 2 and int(reused[1]) > 0


def test_openai_client_chat_and_completions(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    messages = [{"role": "user", "content": "List three colors."}]
    chat = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=12, temperature=0)
    text = chat.choices[0].message.content
    assert text and chat.usage.completion_tokens == 12 and chat.choices[0].finish_reason == "length"
    parts = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=12, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
    chunks = list(parts)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 12

    two = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=6, temperature=0.8,
                                         n=2, seed=1, logprobs=True, top_logprobs=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert all(len(c.logprobs.content) == 6 and len(c.logprobs.content[0].top_logprobs) == 2 for c in two.choices)

    done = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                     stop=[" 7"])
    assert done.choices[0].finish_reason == "stop" and "7" not in done.choices[0].text
    assert done.choices[0].text.startswith(" 5")
    streamed = client.completions.create(model="smollm2-135m", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                         stop=[" 7"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_generate_batch_logprobs_and_json_schema(server):
    prompts = ["The capital of France is", "1, 2, 3,"]
    batch = post(server, "/generate", {"text": prompts, "sampling_params": {"max_new_tokens": 5, "temperature": 0},
                                       "return_logprob": True, "logprob_start_len": 0, "return_text_in_logprobs": True})
    assert batch.status_code == 200, batch.text
    for prompt, out in zip(prompts, batch.json()):
        alone = post(server, "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}).json()
        assert out["output_ids"] == alone["output_ids"]
        meta = out["meta_info"]
        assert meta["input_token_logprobs"][0][0] is None and len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
        assert len(meta["output_token_logprobs"]) == 5 and all(lp <= 0 for lp, _, _ in meta["output_token_logprobs"])
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    out = post(server, "/generate", {"text": "Alice is 30. As JSON:", "sampling_params": {
        "max_new_tokens": 24, "json_schema": json.dumps(schema)}}).json()
    assert isinstance(json.loads(out["text"])["age"], int)


def test_pic_through_the_api_reuses_documents_behind_a_new_prefix(server, hotpot, corpus):
    ex = hotpot[5]
    docs = list(ex.paragraphs[:4])
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY)

    def ask(system):
        r = client.chat.completions.create(model="m", max_tokens=4, temperature=0, extra_body={"documents": docs},
                                           messages=[{"role": "system", "content": system},
                                                     {"role": "user", "content": ex.question}])
        return r.model_extra["epic"]

    first, second = ask(SYSTEM_A), ask(SYSTEM_B)
    print(f"\nPIC over HTTP: first TTFT {first['ttft'] * 1000:.0f} ms (compiled {first['compiled_tokens']}), "
          f"second (new system prompt) {second['ttft'] * 1000:.0f} ms (reused {second['reused_tokens']})")
    assert first["compiled_tokens"] > 0 and second["compiled_tokens"] == 0  # reuse, by its counters (not by time)
    assert second["reused_tokens"] > 0

    # kv_hints spans on /generate: the same documents' text, marked by character offsets
    text = "Context:\n" + "".join(d + "\n\n" for d in docs) + "Question: " + ex.question + "\nAnswer:"
    spans, at = [], len("Context:\n")
    for d in docs:
        spans.append([at, at + len(d)])
        at += len(d) + 2
    body = {"text": text, "sampling_params": {"max_new_tokens": 2}, "kv_hints": {"spans": spans}}
    post(server, "/generate", body)
    hinted = post(server, "/generate", body).json()["meta_info"]
    assert hinted["reused_tokens"] > 0 and hinted["compiled_tokens"] == 0

    # transparent: ingested documents found inside a plain prompt, no client change
    doc_id, doc = next(iter(corpus.items()))
    plain = {"text": f"Read this.\n{doc}\n\nWhat is it about?", "sampling_params": {"max_new_tokens": 2}}
    post(server, "/generate", plain)
    found = post(server, "/generate", plain).json()["meta_info"]
    assert found["reused_tokens"] > 0 and found["compiled_tokens"] == 0
    by_id = post(server, "/generate", {**plain, "kv_hints": {"doc_ids": [doc_id], "policy": "naive"}}).json()["meta_info"]
    assert by_id["policy"] == "naive" and by_id["reused_tokens"] == found["reused_tokens"] + 16


def test_rag_endpoint_cites_retrieved_documents(server, hotpot, corpus):
    question = hotpot[0].question
    out = post(server, "/v1/rag", {"question": question, "top_k": 3, "sampling_params": {"max_new_tokens": 8}})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["answer"] and len(body["documents"]) == 3
    assert {d["id"] for d in body["documents"]} <= set(corpus)
    assert body["timings"]["retrieval_s"] > 0 and body["usage"]["reused_tokens"] + body["usage"]["compiled_tokens"] > 0
    scores = [d["score"] for d in body["documents"]]
    assert scores == sorted(scores, reverse=True)  # in the order that ranked them (the fused score)
    assert all(-1 <= d["similarity"] <= 1 for d in body["documents"])  # and the dense cosine beside it
    events = sse_events(post(server, "/v1/rag", {"question": question, "top_k": 3, "stream": True,
                                                 "sampling_params": {"max_new_tokens": 8}}, stream=True))
    assert events[0]["documents"] == body["documents"] and events[-1] == "[DONE]"
    assert events[-2]["answer"] == body["answer"]
    none = post(server, "/v1/rag", {"question": question, "min_score": 0.999})  # nothing that close
    assert none.status_code == 200 and none.json()["answer"] is None and none.json()["documents"] == []
    assert "matched the question with similarity >= 0.999" in none.json()["message"]


def test_openai_extras_echo_logprobs_inline_documents_and_model_path(server, engine):
    r = post(server, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 2, "logprobs": 2,
                                         "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == prompt_tokens + 2 and lp["token_logprobs"][0] is None  # the prompt's, OpenAI's way
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:]) and lp["top_logprobs"][0] is None
    assert choice["text"].startswith("The capital of France is") and lp["text_offset"][0] == 0
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Which river?"}],
                                                 "documents": [{"text": "The Verda river runs through Alder Bay."},
                                                               "A plain text document."], "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    assert chat.json()["epic"]["reused_tokens"] + chat.json()["epic"]["compiled_tokens"] > 0
    info = requests.get(f"{server}/get_model_info", headers=AUTH, timeout=60).json()
    assert info["model_path"] == str(engine.model_dir) and info["served_model_name"] == "smollm2-135m"
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(info["model_path"]).encode("hi")  # what SGLang's frontend does with it


def test_documents_are_namespaced_and_admin_only(server):
    add = post(server, "/v1/documents", {"documents": [{"text": "The Zorblat river is 40 km long.", "title": "Zorblat"}],
                                         "namespace": "tenant-a", "precompile": True}, headers=ADMIN_AUTH)
    assert add.status_code == 200, add.text
    doc_id = add.json()["ids"][0]
    assert add.json()["compiled_tokens"] > 0
    assert post(server, "/v1/documents", {"documents": ["x"]}).status_code == 403  # the plain key is not admin
    listed = requests.get(f"{server}/v1/documents", params={"namespace": "tenant-a"}, headers=ADMIN_AUTH).json()
    assert [d["id"] for d in listed["documents"]] == [doc_id] and listed["total"] == 1
    assert requests.get(f"{server}/v1/documents/{doc_id}", headers=ADMIN_AUTH).json()["text"].startswith("The Zorblat")
    assert requests.delete(f"{server}/v1/documents/{doc_id}", headers=ADMIN_AUTH).json() == {"deleted": 1}
    assert requests.get(f"{server}/v1/documents/{doc_id}", headers=ADMIN_AUTH).status_code == 404


@pytest.mark.parametrize("path,body,headers,status,message", [
    ("/generate", "{not json", AUTH, 400, "malformed JSON"),
    ("/generate", {"text": "hi", "sampling_params": {"temprature": 0}}, AUTH, 400, "unknown sampling_params key 'temprature'"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, AUTH, 400, "max_new_tokens must be >= 0"),
    ("/generate", {"text": "word " * 9000}, AUTH, 400, "exceeds the model's context"),
    ("/generate", {"text": "hi", "kv_hints": {"doc_ids": [987654]}}, AUTH, 404, "unknown document id(s) in namespace"),
    ("/generate", {"text": "hi", "kv_hints": {"spans": [[0, 99]]}}, AUTH, 400, "outside the prompt"),
    ("/generate", {"text": "hi", "sampling_params": {"regex": "(unclosed"}}, AUTH, 400, "cannot compile regex"),
    ("/generate", {"text": "hi", "bogus": 1}, AUTH, 400, "unknown field(s) bogus"),
    ("/generate", {"text": "hi"}, {}, 401, "API key"),
    ("/v1/chat/completions", {"messages": []}, AUTH, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -2}, AUTH, 400, "max_new_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "documents": [{"id": 424242}]}, AUTH, 404,
     "unknown document id"),
    ("/v1/rag", {"question": ""}, AUTH, 400, "question must be a non-empty string"),
    ("/v1/documents", {"documents": ["x"]}, AUTH, 403, "admin API key"),
    ("/flush_cache", {}, AUTH, 403, "admin API key"),
    ("/generate", '{"text": "hi", "sampling_params": {"temperature": NaN}}', AUTH, 400, "NaN is not a number"),
    ("/generate", {"text": "hi", "sampling_params": {"temperature": 1e999}}, AUTH, 400, "Infinity is not a number"),
    ("/generate", {"text": "hi", "stream": "no"}, AUTH, 400, "stream must be true or false"),
    ("/generate", {"text": "hi", "sampling_params": {"top_k": True}}, AUTH, 400, "top_k must be an integer"),
    ("/generate", {"text": "hi", "sampling_params": {"seed": 1 << 70}}, AUTH, 400, "seed must be an integer in the 64-bit"),
    ("/generate", '{"text": "hi \\ud800"}', AUTH, 400, "lone surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": -3, "logprobs": True},
     AUTH, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 151936, "logprobs": True},
     AUTH, 400, "less than or equal to 20"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, AUTH, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, AUTH, 400, "less than or equal to 5"),
    ("/v1/rag", {"question": "q?", "min_score": "abc"}, AUTH, 400, "min_score must be a number"),
    ("/v1/rag", {"question": "q?", "system": 123}, AUTH, 400, "system must be a string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "documents": [{"id": 1 << 70}]}, AUTH, 404,
     "unknown document id"),
    ("/generate", {"text": "hi"}, {"Authorization": b"Bearer \xff\xfe"}, 401, "API key"),
])
def test_bad_input_gets_a_4xx_with_a_message_and_the_server_keeps_serving(server, path, body, headers, status, message):
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(f"{server}{path}", data=data, headers={**headers, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert requests.get(f"{server}/health_generate", headers=AUTH, timeout=60).json()["status"] == "ok"


def test_oversized_body_is_refused(server):
    r = requests.post(f"{server}/generate", data=b"x" * (9 << 20), headers=AUTH, timeout=60)
    assert r.status_code == 413 and "request body over" in r.json()["error"]["message"]


def test_client_disconnect_aborts_and_frees_the_request(server):
    body = {"text": "Tell me a long story.", "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    with post(server, "/generate", body, stream=True) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert got[0].startswith(b"data: ")
    info = kv_clean(server)
    assert info["running"] == 0 and info["kv"]["private"] == 0 and info["kv"]["locked"] == 0


def test_load_200_requests_16_concurrent_mixed_streaming(server, hotpot):
    questions = [ex.question for ex in hotpot[:20]]
    docs = [p for ex in hotpot[:4] for p in ex.paragraphs[:3]]

    def one(i: int) -> str | None:
        if i % 4 == 0:  # documents through the chat API, streaming
            body = {"messages": [{"role": "user", "content": questions[i % 20]}], "max_tokens": 6, "temperature": 0,
                    "stream": True, "documents": docs[i % 9: i % 9 + 3]}
            r = post(server, "/v1/chat/completions", body, stream=True)
            events = sse_events(r) if r.status_code == 200 else []
            return None if events and events[-1] == "[DONE]" else f"{r.status_code} {r.text[:200]}"
        body = {"text": f"Question {i}: {questions[i % 20]}\nAnswer:", "stream": i % 2 == 1,
                "sampling_params": {"max_new_tokens": 6, "temperature": 0.7, "seed": i}}
        r = post(server, "/generate", body, stream=body["stream"])
        if r.status_code != 200:
            return f"{r.status_code} {r.text[:200]}"
        if body["stream"]:
            events = sse_events(r)
            return None if events[-1] == "[DONE]" and events[-2]["meta_info"]["finish_reason"] else "bad stream"
        return None if r.json()["meta_info"]["completion_tokens"] >= 1 else "no tokens"

    with ThreadPoolExecutor(16) as pool:
        errors = [e for e in pool.map(one, range(200)) if e]
    assert errors == []
    info = kv_clean(server)
    kv = info["kv"]
    assert (kv["private"], kv["locked"], kv["request_rows_in_use"]) == (0, 0, 0)
    assert kv["free"] + kv["cached"] == kv["total"]
    metrics = requests.get(f"{server}/metrics", timeout=60).text  # open to scrapers without the key
    count = re.search(r"^epic_time_to_first_token_seconds_count\{policy=\"legolink-16\"\} (\S+)", metrics, re.M)
    assert count and float(count.group(1)) >= 200
    assert re.search(r"^epic_tokens_total\{kind=\"reused\"\} [1-9]", metrics, re.M)


def test_serve_cli_finishes_in_flight_requests_on_sigterm(tmp_path):
    import signal
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "epic_sglang.cli", "serve", "--model", "smollm2-135m",
                             "--port", str(port), "--kv-dir", "none", "--device", "cpu", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        r = requests.post(f"{url}/generate", stream=True, timeout=300, json={
            "text": "Tell me a story.", "stream": True, "sampling_params": {"max_new_tokens": 48, "ignore_eos": True}})
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: "))  # its first token: in flight for sure
        proc.send_signal(signal.SIGTERM)
        events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
        assert events[-1]["meta_info"]["completion_tokens"] == 48 and events[-1]["meta_info"]["finish_reason"]
        # uvicorn re-raises the signal once shut down, so the exit reads as SIGTERM
        assert proc.wait(120) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()


def test_serve_cli_rejects_bad_arguments_in_one_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "epic_sglang.cli", "serve", "--policy", "magic"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "unknown policy" in out.stderr


def test_a_prompt_larger_than_the_kv_pool_gets_a_503_and_the_server_keeps_serving():
    """Too little memory is the server's state, not the client's error: 503 with what to know."""
    from epic_sglang import Engine

    small = Engine("smollm2-135m", device="cpu", kv_cache_gb=0.001)  # the smallest pool: 4,096 tokens
    with serve_in_thread(create_app(ServerConfig(model="smollm2-135m"), engine=small)) as url:
        r = requests.post(f"{url}/generate", json={"text": "word " * 5000, "sampling_params": {"max_new_tokens": 2}},
                          timeout=300)
        assert r.status_code == 503, r.text
        assert "needs more KV memory than the server has" in r.json()["error"]["message"]
        ok = requests.post(f"{url}/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}}, timeout=300)
        assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 2
