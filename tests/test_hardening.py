"""One client can never hurt another: fuzzed and poisoned requests, keys and namespaces.

The server runs with per-tenant keys (alice: her namespace; bob: his and "shared"), a shared
user key and an admin key, over a store holding one document in each namespace."""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epic_sglang import Request, SamplingParams
from epic_sglang.scheduler import Scheduler
from epic_sglang.server import ServerConfig, create_app
from epic_sglang.server.background import serve_in_thread
from tests import fuzz_bodies

KEYS = {"alice": "k-alice", "bob": "k-bob"}
USER, ADMIN = "k-user", "k-admin"
DOCS = {"alice": "Alice's notebook: the Quillon bridge opened in 1931 and spans the Verda river.",
        "bob": "Bob's ledger: the Marrow tunnel opened in 1957 under the Kessel hills.",
        "shared": "Shared memo: the Ostra lighthouse was rebuilt in 1888 after the storm.",
        "default": "Public note: the Penwick ferry crosses the Tamsin strait twice an hour."}
ALLOWED = {"alice": {"alice"}, "bob": {"bob", "shared"}, "admin": set(DOCS)}


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps([{"key": KEYS["alice"], "name": "alice"},
                                {"key": KEYS["bob"], "name": "bob", "namespaces": ["bob", "shared"]}]))
    config = ServerConfig(model="smollm2-135m", store=tmp_path_factory.mktemp("store"), api_key=USER,
                          admin_api_key=ADMIN, api_keys=keys, max_running=8, default_max_new_tokens=3)
    with serve_in_thread(create_app(config, engine=engine)) as url:
        ids = {}
        for ns, text in DOCS.items():
            r = requests.post(f"{url}/v1/documents", json={"documents": [text], "namespace": ns}, headers=auth(ADMIN),
                              timeout=300)
            assert r.status_code == 200, r.text
            ids[ns] = r.json()["ids"][0]
        yield url, ids


def post(url: str, path: str, body, key: str):
    return requests.post(f"{url}{path}", data=json.dumps(body), headers=auth(key), timeout=300)


# ----------------------------------------------------------------- who may read what
READS = {  # route -> request reading the namespace's document (by id, or by its text)
    "chat documents by id": lambda ns, ids: ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "When?"}], "documents": [{"id": ids[ns]}], "namespace": ns}),
    "generate kv_hints.doc_ids": lambda ns, ids: ("/generate", {
        "text": f"{DOCS[ns]}\n\nWhen?", "kv_hints": {"doc_ids": [ids[ns]], "namespace": ns}}),
    "completions kv_hints.doc_ids": lambda ns, ids: ("/v1/completions", {
        "prompt": f"{DOCS[ns]}\n\nWhen?", "kv_hints": {"doc_ids": [ids[ns]]}, "namespace": ns}),
    "rag": lambda ns, ids: ("/v1/rag", {"question": DOCS[ns], "namespace": ns, "top_k": 1}),
}


def read_ok(route: str, r, ns: str, ids) -> bool:
    if r.status_code != 200:
        return False
    if route == "rag":
        return ids[ns] in [d["id"] for d in r.json()["documents"]]
    return True


def test_no_document_is_read_across_keys_or_namespaces(server):
    url, ids = server
    leaks, refused_allowed = [], []
    for who in ("alice", "bob", "admin"):
        key = ADMIN if who == "admin" else KEYS[who]
        for ns in DOCS:
            for route, make in READS.items():
                path, body = make(ns, ids)
                r = post(url, path, body, key)
                assert r.status_code < 500, r.text
                if read_ok(route, r, ns, ids) and ns not in ALLOWED[who]:
                    leaks.append((who, ns, route))
                if ns in ALLOWED[who] and not read_ok(route, r, ns, ids):
                    refused_allowed.append((who, ns, route, r.status_code, r.text[:120]))
                if ns not in ALLOWED[who]:
                    assert r.status_code == 403 and "may not use namespace" in r.json()["error"]["message"]
            # a document id from another namespace reads as unknown, exactly like one that does not exist
            other = next(n for n in DOCS if n not in ALLOWED[who]) if who != "admin" else None
            if other is not None:
                mine = sorted(ALLOWED[who])[0]
                foreign = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}],
                                                             "documents": [{"id": ids[other]}], "namespace": mine}, key)
                absent = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}],
                                                            "documents": [{"id": 10 ** 12}], "namespace": mine}, key)
                assert foreign.status_code == absent.status_code == 404
                assert foreign.json()["error"]["message"].split(":")[0] == absent.json()["error"]["message"].split(":")[0]
    assert leaks == [] and refused_allowed == []
    # user keys cannot read documents through the admin routes at all
    for key in (KEYS["alice"], USER):
        assert requests.get(f"{url}/v1/documents/{ids['alice']}", headers=auth(key), timeout=60).status_code == 403


def test_transparent_detection_stays_inside_the_namespace(server):
    url, ids = server
    for who, mine in (("alice", "alice"), ("bob", "bob")):
        for ns, text in DOCS.items():
            r = post(url, "/generate", {"text": f"{text}\n\nWhen did it open?", "kv_hints": {"namespace": mine},
                                        "sampling_params": {"max_new_tokens": 1}}, KEYS[who])
            assert r.status_code == 200, r.text
            found = r.json()["meta_info"]["reused_tokens"] + r.json()["meta_info"]["compiled_tokens"]
            assert (found > 0) == (ns == mine), (who, ns, r.json()["meta_info"])  # linked only if it is hers / his


def test_keys_schemes_and_admin_everywhere(server):
    url, _ = server
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 1}}
    for header in (f"Bearer {USER}", f"bearer {USER}", f"BEARER  {USER}", f"Bearer {ADMIN}", f"Bearer {KEYS['bob']}"):
        r = requests.post(f"{url}/generate", json=body, headers={"Authorization": header}, timeout=60)
        assert r.status_code == 200, (header, r.text)
    for header in (b"Bearer \xff\xfe", b"Basic abc", b"Bearer", f"Bearer {USER}x".encode()):
        r = requests.post(f"{url}/generate", json=body, headers={"Authorization": header}, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = requests.post(f"{url}/v1/documents", json={"documents": ["x"]}, headers=auth(KEYS["alice"]), timeout=60)
    assert r.status_code == 403 and "admin API key" in r.json()["error"]["message"]


def test_a_rid_is_unique_in_flight_and_only_its_owner_aborts_it(server):
    url, _ = server
    long = {"text": "Tell me a long story.", "rid": "shared-rid", "stream": True,
            "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    with requests.post(f"{url}/generate", data=json.dumps(long), headers=auth(KEYS["alice"]), stream=True,
                       timeout=300) as first:
        lines = first.iter_lines()
        assert next(line for line in lines if line.startswith(b"data: "))  # alice's request is in flight
        again = post(url, "/generate", {**long, "stream": False}, KEYS["bob"])
        assert again.status_code == 409 and "in flight" in again.json()["error"]["message"]
        assert post(url, "/abort_request", {"rid": "shared-rid"}, KEYS["bob"]).status_code == 404  # not his
        assert post(url, "/abort_request", {"abort_all": True}, KEYS["bob"]).status_code == 200  # his (none)
        assert post(url, "/abort_request", {"rid": "shared-rid"}, KEYS["alice"]).status_code == 200
        events = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(events[-1]["output_ids"]) < 400


# ----------------------------------------------------------------- fuzz
def check(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and error["code"] == r.status_code


FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)


@pytest.mark.parametrize("route,examples", [("/generate", 700), ("/v1/chat/completions", 500),
                                            ("/v1/completions", 350), ("/v1/rag", 200), ("/v1/documents", 150),
                                            ("/abort_request", 100)])
def test_fuzzed_bodies_get_json_answers_and_never_a_5xx(server, route, examples):
    url, _ = server

    @settings(FUZZ, max_examples=examples)
    @given(body=fuzz_bodies.body_bytes(route), key=st.sampled_from([USER, ADMIN, KEYS["alice"], KEYS["bob"]]))
    def one(body, key):
        check(requests.post(f"{url}{route}", data=body, headers=auth(key), timeout=300))
    one()
    assert requests.get(f"{url}/health_generate", headers=auth(USER), timeout=60).json()["status"] == "ok"


@settings(FUZZ, max_examples=150)
@given(path=fuzz_bodies.GET_PATHS, header=fuzz_bodies.AUTHORIZATION)
def test_fuzzed_paths_and_headers(server, path, header):
    url, _ = server
    headers = {} if header is None else {"Authorization": header}
    check(requests.get(f"{url}{path}", headers=headers, timeout=60))


# ----------------------------------------------------------------- one bad request among good ones
def test_a_poisoned_request_fails_alone_and_the_others_keep_their_tokens(engine, hotpot):
    """A request that passed admission and breaks while sampling (NaN temperature set after
    validation) fails by itself; the requests batched with it finish with the tokens they
    get alone, and the scheduler serves new ones."""
    good = [Request(ex.question, list(ex.paragraphs[:2]), None, "legolink-16", SamplingParams(max_new_tokens=6))
            for ex in hotpot[:3]]
    alone = [engine.generate_batch([r])[0].output_ids for r in good]
    scheduler = Scheduler(engine, max_running=8)
    done, results = threading.Event(), {}

    def collect(p):
        if p.done:
            results[p.rid] = p
            if len(results) == 4:
                done.set()
    poisoned = Request("Poisoned?", [], None, "naive", SamplingParams(max_new_tokens=6, temperature=0.7))
    rids = [scheduler.submit(r, collect) for r in good[:2]] + [scheduler.submit(poisoned, collect)] \
        + [scheduler.submit(good[2], collect)]
    poisoned.sampling.temperature = float("nan")  # after validation: it breaks inside the batched step
    scheduler.start()
    try:
        assert done.wait(300)
        assert results[rids[2]].error is not None and "internal error" in results[rids[2]].error
        assert [results[r].result.output_ids for r in rids[:2] + rids[3:]] == alone
        late = {}
        scheduler.submit(Request("Still there?", [], None, "naive", SamplingParams(max_new_tokens=2)),
                         lambda p: p.done and late.setdefault("p", p))
        deadline = time.time() + 120
        while "p" not in late and time.time() < deadline:
            time.sleep(0.05)
        assert late["p"].result is not None and len(late["p"].result.output_ids) == 2
    finally:
        scheduler.shutdown(timeout=120)
    kv = engine.kv_usage()
    assert (kv["private"], kv["locked"], kv["request_rows_in_use"]) == (0, 0, 0)


def test_health_answers_while_a_large_response_is_built(server):
    """The largest answers (many samples with top logprobs, prompt logprobs) are built and
    serialized off the event loop: /health stays quick meanwhile."""
    url, _ = server
    big = {"text": "word " * 300, "return_logprob": True, "top_logprobs_num": 20, "logprob_start_len": 0,
           "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 24, "ignore_eos": True, "n": 8}}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, url, "/generate", big, USER)
        slowest = 0.0
        while not pending.done():
            t0 = time.perf_counter()
            assert requests.get(f"{url}/health", timeout=10).status_code == 200
            slowest = max(slowest, time.perf_counter() - t0)
            time.sleep(0.05)
        r = pending.result()
    assert r.status_code == 200 and len(r.json()) == 8
    assert len(r.json()[0]["meta_info"]["input_top_logprobs"]) > 300
    assert slowest < 1.0, f"/health took {slowest:.2f} s while the answer was built"
    too_big = {**big, "sampling_params": {**big["sampling_params"], "max_new_tokens": 8000, "n": 16}}  # ~2.8M entries
    r = post(url, "/generate", too_big, USER)
    assert r.status_code == 400 and "ask for fewer" in r.json()["error"]["message"]


def test_key_files_and_grants(tmp_path):
    from epic_sglang.server.access import OPEN, AccessPolicy, Forbidden, load_keys

    f = tmp_path / "keys.json"
    f.write_text(json.dumps([{"key": "a", "name": "alice"}, {"key": "b", "name": "bob", "namespaces": ["x", "y"]},
                             {"key": "r", "name": "root", "admin": True}]))
    policy = AccessPolicy(api_key="u", api_keys=f)
    alice, bob, root, user = (policy.grant(k) for k in ("a", "b", "r", "u"))
    assert policy.keys_required and policy.grant("nope") is None and policy.grant(None) is None
    assert alice.namespace(None) == "alice" and bob.namespace(None) == "x" and bob.namespace("y") == "y"
    assert root.admin and root.namespace("anything") == "anything" and user.namespace("any") == "any"
    with pytest.raises(Forbidden, match="may not use namespace 'x'"):
        alice.namespace("x")
    assert AccessPolicy().grant(None) is OPEN and not AccessPolicy().keys_required
    for bad, message in (([{"key": "a"}], "needs a non-empty key and name"), ({"key": "a"}, "JSON list"),
                         ([{"key": "a", "name": "n", "namespaces": []}], "non-empty list"),
                         ([{"key": "a", "name": "n"}, {"key": "b", "name": "n"}], "appears twice"),
                         ([{"key": "a", "name": "n", "admin": "yes"}], "true or false")):
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            load_keys(f)
