"""The server under fuzzed and poisoned traffic: 5xx and hung requests counted. -> BENCHMARKS.md

    python benchmarks/server_hardening.py [--model smollm2-135m] [--cases 2000] [--clients 200]

1. Fuzz: `--cases` requests drawn from tests/fuzz_bodies.py's strategies (every POST route,
   random and adversarial bodies, random keys; GET paths and Authorization headers),
   derandomized, sent one after another; the statuses are counted per route, and any 5xx,
   any error without the JSON envelope, and any request unanswered within its timeout.
2. Load: `--clients` clients at once, each sending `--per-client` requests, one in five
   poisoned (NaN or Infinity numbers, out-of-range logprobs, lone surrogates, wrong types);
   the good ones must all answer 200 with tokens, the poisoned ones 4xx; plus /health
   latency, sampled while the load runs.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang.server import ServerConfig, create_app  # noqa: E402
from epic_sglang.server.background import serve_in_thread  # noqa: E402
from tests import fuzz_bodies  # noqa: E402

USER, ADMIN = "k-user", "k-admin"
POISON = [  # what the hostile client sent, and its kin
    b'{"text": "hi", "sampling_params": {"temperature": NaN}}',
    b'{"text": "hi", "sampling_params": {"temperature": Infinity}}',
    b'{"text": "hi \\ud800"}',
    b'{"text": "hi", "stream": "no"}',
    b'{"text": "hi", "sampling_params": {"top_k": true}}',
    b'{"text": "hi", "sampling_params": {"seed": 1180591620717411303424}}',
    b'{"text": "hi", "top_logprobs_num": 151936, "return_logprob": true}',
    b'{"text": [], "input_ids": [1]}',
]
GOOD = b'{"text": "Say something short.", "sampling_params": {"max_new_tokens": 4, "ignore_eos": true}}'


def fuzz(url: str, cases: int) -> tuple[dict[str, Counter], list[str]]:
    routes = list(fuzz_bodies.ROUTES)
    per_route = {r: max(1, cases // (len(routes) + 1)) for r in routes}
    counts: dict[str, Counter] = {}
    bad: list[str] = []

    def record(route: str, r: requests.Response | None, what: str) -> None:
        status = "timeout" if r is None else r.status_code
        counts.setdefault(route, Counter())[status] += 1
        if r is None or r.status_code >= 500:
            answer = r.text[:200] if r is not None else ""
            bad.append(f"{route} {status}: {what[:120]!r} -> {answer}")
        elif r.status_code >= 400:
            try:
                assert r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError, AssertionError):
                bad.append(f"{route} {status} without the JSON envelope: {what[:120]!r}")

    def send(method: str, route: str, url_path: str, **kw) -> None:
        try:
            r = requests.request(method, f"{url}{url_path}", timeout=120, **kw)
        except requests.Timeout:
            r = None
        record(route, r, repr(kw.get("data", url_path)))

    run = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def post_route(route: str):
        @settings(run, max_examples=per_route[route])
        @given(body=fuzz_bodies.body_bytes(route), key=st.sampled_from([USER, ADMIN, None]))
        def one(body, key):
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
            send("POST", route, route, data=body, headers=headers)
        return one

    for route in routes:
        post_route(route)()

    @settings(run, max_examples=cases - sum(per_route.values()))
    @given(path=fuzz_bodies.GET_PATHS, header=fuzz_bodies.AUTHORIZATION)
    def get(path, header):
        send("GET", "GET paths", path, headers={} if header is None else {"Authorization": header})
    get()
    return counts, bad


def load(url: str, clients: int, per_client: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    plan = [[rng.random() < 0.2 for _ in range(per_client)] for _ in range(clients)]
    out = Counter()
    health: list[float] = []
    stop = threading.Event()

    def probe():
        while not stop.is_set():
            t0 = time.perf_counter()
            requests.get(f"{url}/health", timeout=30)
            health.append(time.perf_counter() - t0)
            time.sleep(0.2)

    def client(poisoned: list[bool]) -> None:
        for bad in poisoned:
            body = rng.choice(POISON) if bad else GOOD
            try:
                r = requests.post(f"{url}/generate", data=body, timeout=600,
                                  headers={"Authorization": f"Bearer {USER}", "Content-Type": "application/json"})
            except requests.Timeout:
                out["hung"] += 1
                continue
            if r.status_code >= 500:
                out["5xx"] += 1
            elif bad:
                out["poisoned refused (4xx)" if 400 <= r.status_code < 500 else "poisoned ACCEPTED"] += 1
            else:
                ok = r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 4
                out["good served" if ok else "good FAILED"] += 1

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, plan))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    stop.set()
    prober.join()
    out["health_max_ms"] = round(1000 * max(health), 1) if health else 0
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--per-client", type=int, default=5)
    args = ap.parse_args()
    config = ServerConfig(model=args.model, device=args.device, store=Path(tempfile.mkdtemp()), api_key=USER,
                          admin_api_key=ADMIN, kv_dir=None, max_running=32, default_max_new_tokens=3, max_queued=4096)
    with serve_in_thread(create_app(config)) as url:
        requests.post(f"{url}/v1/documents", json={"documents": ["The Penwick ferry crosses the Tamsin strait."]},
                      headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300)
        t0 = time.perf_counter()
        counts, bad = fuzz(url, args.cases)
        fuzz_s = time.perf_counter() - t0
        alive = requests.get(f"{url}/health_generate", headers={"Authorization": f"Bearer {USER}"}, timeout=120).ok
        loaded = load(url, args.clients, args.per_client)
    statuses = sorted({s for c in counts.values() for s in c}, key=str)
    rows = [f"| {route} | {sum(c.values())} | " + " | ".join(str(c.get(s, 0)) for s in statuses) + " |"
            for route, c in counts.items()]
    total = sum(sum(c.values()) for c in counts.values())
    fives = sum(n for c in counts.values() for s, n in c.items() if s == "timeout" or (isinstance(s, int) and s >= 500))
    body = f"""## Server under fuzzed and poisoned traffic ({args.model}, {machine()})

Fuzz: {total:,} requests from `tests/fuzz_bodies.py` (derandomized hypothesis strategies: every POST
route with random and adversarial bodies and keys, GET paths, Authorization headers), one after
another, in {fuzz_s:.0f} s. 5xx or unanswered: **{fives}**; errors without the JSON envelope:
**{sum('without the JSON envelope' in b for b in bad)}**; `/health_generate` afterwards: {'ok' if alive else 'FAILED'}.

| route | requests | {" | ".join(str(s) for s in statuses)} |
|---|---|{"---|" * len(statuses)}
{chr(10).join(rows)}

Load: {args.clients} clients at once, {args.per_client} requests each (one in five poisoned: NaN / Infinity,
lone surrogates, out-of-range logprobs, wrong types), 4 tokens per good request:

| outcome | count |
|---|---|
{chr(10).join(f"| {k} | {v} |" for k, v in sorted(loaded.items()))}
{chr(10).join("- " + b for b in bad[:20])}
"""
    write_section(f"server-hardening-{args.model}", body)
    print(body)
    sys.exit(1 if fives or bad or not alive or loaded.get("5xx") or loaded.get("hung")
             or loaded.get("good FAILED") or loaded.get("poisoned ACCEPTED") else 0)


if __name__ == "__main__":
    main()
