"""Start and stop a SGLang server, with the plugin or (for comparisons) without it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from epic_sglang.policies import Segment
from epic_sglang.sglang_plugin import client, prefill_graphs


def server_command(model_path: str | Path, port: int, plugin: bool = True, extra: list[str] | tuple = (),
                   host: str = "127.0.0.1", env: Mapping[str, str] | None = None) -> list[str]:
    """SGLang's own launcher; the plugin needs FlashInfer attention, and its prefill graphs
    stay off unless `env` (the server's; default ours) lets link passes run in them."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", host, "--port", str(port), "--attention-backend", "flashinfer"]
    if plugin:
        cmd += ["--radix-cache-backend", "epic", *prefill_graphs.server_flags(os.environ if env is None else env)]
    return cmd + list(extra)


def server_env(plugin: bool = True, kv_dir: Path | None = None, host_cache_gb: float = 0.0) -> dict[str, str]:
    """SGLANG_PLUGINS whitelists entry points by name: "epic", or none at all; the `epic`
    backend reads its tiers from the environment (radix_ext/sglang_backend.py)."""
    env = {**os.environ, "SGLANG_PLUGINS": "epic" if plugin else "-",
           "EPIC_SGLANG_HOST_CACHE_GB": str(host_cache_gb)}
    if kv_dir is not None:
        env["EPIC_SGLANG_KV_DIR"] = str(kv_dir)
    return env


def wait_until_ready(proc: subprocess.Popen, url: str, timeout_s: float, what: str) -> str:
    """`url` once its /health_generate answers (a generation went through); an error naming
    `what` if the process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if requests.get(url + "/health_generate", timeout=30).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(2)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


WARMUP_NAMESPACE = "epic-warmup"  # the warm-up's documents: no tenant's requests match them
WARMUP_QUERYLINK = "querylink-4-h1"  # on its 16-token documents: a scout that picks 6 tokens


def warmup_prompts() -> tuple[list[Segment], list[Segment]]:
    """Two tiny link requests that run every kernel a link takes: one over two compiled
    documents (shared runs, rotated queries, the merge, a linked decode step), one with a
    document not compiled (computed in its row beside a cached one)."""
    doc = [Segment(tuple(range(100 + 16 * i, 116 + 16 * i)), document=f"warmup-{i}") for i in range(3)]
    head, question = Segment((90, 91, 92, 93)), Segment((94, 95, 96, 97))
    return [head, doc[0], doc[1], question], [head, doc[2], doc[0], question]


RAG_DOC, RAG_HEAD, RAG_QUESTION, RAG_OUTPUT = 512, 32, 64, 32  # the RAG load's request (sglang_pic.py)
RAG_TEXT = RAG_HEAD + RAG_QUESTION


def rag_prompt(documents: int) -> list[Segment]:
    """A link request shaped as the RAG load sends them (ids below every model's vocabulary): in
    session 24 the load's first such request stalled the scheduler 104 s after the tiny prompts
    above had run (BENCHMARKS.md, session 25's notes), so the warm-up runs one too."""
    ids = iter(range(1000, 1000 + RAG_TEXT + documents * RAG_DOC))
    take = lambda n: tuple(next(ids) for _ in range(n))  # noqa: E731
    return [Segment(take(RAG_HEAD)), *(Segment(take(RAG_DOC), document=f"warmup-rag-{i}") for i in range(documents)),
            Segment(take(RAG_QUESTION))]


def warm_link_path(url: str, timeout_s: float = 900, api_key: str | None = None) -> None:
    """Run the plugin's link path once before anyone is served: FlashInfer and Triton compile
    its kernels on first use (a fresh GPU host without their caches took 107 s over the first
    link pass: BENCHMARKS.md, the RAG load), which would otherwise fall on the first user.
    Tiny prompts cover each path (a missing document, querylink's scout, a link beside a
    decode), then one RAG-shaped greedy request (`rag_prompt`: 8 documents, or as many as the
    server's context holds; none if not one)."""
    compiled, with_missing = warmup_prompts()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        for body in client.compile_bodies(compiled, WARMUP_NAMESPACE):
            _post(url, body, timeout_s, headers)
        # legolink's link path, with a document missing too, then querylink's scout (its Triton kernels)
        for prompt, policy in ((compiled, "legolink-1"), (with_missing, "legolink-1"), (compiled, WARMUP_QUERYLINK)):
            _post(url, _warmup_body(prompt, policy, 2), timeout_s, headers)
        _link_beside_a_decode(url, compiled, timeout_s, headers)
        longest = _ok(requests.get(url + "/server_info", timeout=timeout_s, headers=headers)).json()["max_req_input_len"]
        if (documents := min(8, (int(longest) - RAG_TEXT - RAG_OUTPUT) // RAG_DOC)) > 0:  # as many as its context holds
            rag = rag_prompt(documents)
            for body in client.compile_bodies(rag, WARMUP_NAMESPACE):
                _post(url, body, timeout_s, headers)
            params = {"max_new_tokens": RAG_OUTPUT, "temperature": 0.0, "ignore_eos": True}
            _post(url, client.generate_body(rag, "legolink-16", params, WARMUP_NAMESPACE), timeout_s, headers)
    except requests.RequestException as err:
        raise RuntimeError(f"SGLang server at {url} failed the plugin's link warm-up: {err}") from None


def _warmup_body(prompt: list[Segment], policy: str, new_tokens: int, **fields) -> dict:
    return client.generate_body(prompt, policy, {"max_new_tokens": new_tokens, "ignore_eos": True}, WARMUP_NAMESPACE,
                                **fields)


def _link_beside_a_decode(url: str, prompt: list[Segment], timeout_s: float, headers: dict[str, str]) -> None:
    """A link pass sent while another linked request decodes: under SGLang's
    `--enable-mixed-chunk` the two share a forward, whose first run compiled FlashInfer kernels
    for ~90 s on an H100 (BENCHMARKS.md, session 21 notes); otherwise they run one after another."""
    with requests.post(url + "/generate", json=_warmup_body(prompt, "legolink-1", 16, stream=True), stream=True,
                       timeout=timeout_s, headers=headers) as running:
        lines = _ok(running).iter_lines()
        if next((line for line in lines if line), None) is None:
            raise requests.HTTPError("a streamed warm-up request returned no token")
        # its first token is out: it is decoding
        _post(url, _warmup_body(prompt, "legolink-1", 2), timeout_s, headers)
        for _ in lines:
            pass


def _post(url: str, body: dict, timeout_s: float, headers: dict[str, str]) -> None:
    _ok(requests.post(url + "/generate", json=body, timeout=timeout_s, headers=headers))


def _ok(r: requests.Response) -> requests.Response:
    """`r`, if SGLang answered 200; else an error with its status and the start of its body."""
    if r.status_code != 200:
        raise requests.HTTPError(f"{r.status_code} {r.text[:200]}")
    return r


class SGLangServer:
    """`with SGLangServer(model, port) as url:` a ready server (its /health_generate answered,
    and with the plugin its link path warmed: `warm_link_path`), on 127.0.0.1 (the front, or a
    benchmark, is its only client)."""

    def __init__(self, model_path: str | Path, port: int, plugin: bool = True, extra: list[str] | tuple = (),
                 log_path: str | Path | None = None, ready_timeout_s: float = 900, env: dict[str, str] | None = None,
                 api_key: str | None = None):
        """`api_key`: SGLang then requires it on every route but its health checks (the warm-up sends it)."""
        self.env = env if env is not None else server_env(plugin)
        self.cmd = server_command(model_path, port, plugin, extra, env=self.env) + (["--api-key", api_key] if api_key else [])
        self.plugin, self.api_key = plugin, api_key
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path) if log_path else None
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        log = open(self.log_path, "w") if self.log_path else None  # None: SGLang logs to our stdout
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_ready(self.proc, self.url, self.ready_timeout_s, f"SGLang server (log: {self.log_path})")
            if self.plugin:
                warm_link_path(self.url, self.ready_timeout_s, self.api_key)
            return self.url
        except (TimeoutError, RuntimeError):
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
