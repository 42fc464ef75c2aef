"""GPU: EPIC inside a real SGLang 0.5.16 server (the `epic` plugin), checked, then timed.

    python benchmarks/sglang_pic.py --tokenizer DIR [--part check front tp speed load | all]
                                    [--contexts 8192 16384 32768]

1. check, on a small real-architecture checkpoint (Qwen2, random widened weights saved as
   safetensors, so both runtimes read the same bf16 weights):
   - `fr` through the plugin server equals a plain SGLang server (no plugin), token for token;
   - legolink-16, naive, legolink0, cacheblend-15 and querylink-16 through the plugin against
     the in-process engine (FlashInfer, same weights): first-token log-probabilities and greedy
     tokens; `cached_tokens`
     proves the documents' KV was reused; asking again (exact prefix now cached) gives
     the same tokens.
2. speed, on one plugin server with a Llama-3-8B-shaped model and dummy weights (speed does
   not depend on weight values): client-side TTFT over HTTP of RAG prompts (512-token
   documents, 64-token question) whose documents are cached but whose 32-token head is new:
   SGLang's full prefill (a prefix miss), SGLang's exact prefix hit with 64 new tokens
   (the same prompt with another question), legolink-16, naive and querylink-16 through the
   plugin; the KV
   slots a linked request holds; decode steps over the documents read in place against
   SGLang's decode over its own exact KV (batches 1 / 8 / 32 at the largest context).
3. load: the RAG load over a 1,000-document corpus, compiled whole before the linked run.
Writes its tables to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_ttft import LLAMA_8B, model_dir, random_checkpoint, segments  # noqa: E402
from benchmarks.load_trace import (COMPILE_WAIT_S, OUTPUT_TOKENS, TRACE_HEADER, percentile, steady_rate,  # noqa: E402
                                   trace_rows, write_trace)
from benchmarks.report import machine, write_section  # noqa: E402
from benchmarks.torch_trace import complete_events, kernel_busy  # noqa: E402
from epic_sglang.policies import Segment  # noqa: E402
from epic_sglang.sglang_plugin import client, decode_graphs, host_profile  # noqa: E402
from epic_sglang.sglang_plugin.launch import SGLangServer, server_env, wait_until_ready  # noqa: E402

SMALL = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=512, intermediate_size=1024,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=128, rms_norm_eps=1e-5,
             rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=False, vocab_size=49152,
             bos_token_id=1, eos_token_id=2)
GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
PORT = 31000


def generate(url: str, body: dict) -> dict:
    r = requests.post(url + "/generate", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def compile_documents(url: str, segs: list[Segment], sinks: list[int] | None = None) -> None:
    for body in client.compile_bodies(segs, sinks=sinks or ()):
        generate(url, body)


def first_logprobs(out: dict) -> dict[int, float]:
    return {tok: lp for lp, tok, _ in out["meta_info"]["output_top_logprobs"][0]}


def small_checkpoint(tokenizer: Path) -> Path:
    """The small real-architecture checkpoint of the correctness parts (random widened weights)."""
    ckpt = Path(tempfile.mkdtemp(prefix="epic-small-"))
    random_checkpoint(SMALL, tokenizer, ckpt, widen=True)
    return ckpt


def check_prompts(vocab: int) -> list[list[Segment]]:
    """Six prompts of 4 x 120-token documents, a 16-token head and a 24-token question."""
    return [segments(4, 120, 24, 16, vocab, seed=s) for s in range(6)]


def sink_tokens(ckpt: Path) -> list[int]:
    """legolink0's throw-away tokens for this checkpoint, as the engine picks them."""
    from transformers import AutoTokenizer

    from epic_sglang.policies import LEGOLINK0_SINK_TOKENS
    from epic_sglang.prompt import PromptBuilder

    return PromptBuilder(AutoTokenizer.from_pretrained(ckpt)).sink_tokens(LEGOLINK0_SINK_TOKENS)


def plugin_outputs(url: str, prompts: list[list[Segment]], sinks: list[int]) -> dict[str, list[dict]]:
    """fr, then (documents compiled) legolink-16, naive, legolink-16 again, cacheblend-15 and
    querylink-16, then (documents compiled behind `sinks`) legolink0, with the first token's
    top-10 logprobs: what the checks compare."""
    def ask(policy: str) -> list[dict]:
        return [generate(url, client.generate_body(p, policy, GREEDY, return_logprob=True, top_logprobs_num=10))
                for p in prompts]

    out = {"fr": ask("fr")}
    for p in prompts:
        compile_documents(url, p)
    for policy in ("legolink-16", "naive", "legolink-16-again", "cacheblend-15", "querylink-16"):
        out[policy] = ask(policy.removesuffix("-again"))
    for p in prompts:
        compile_documents(url, p, sinks)
    out["legolink0"] = ask("legolink0")
    return out


def max_logprob_gap(a: list[dict], b: list[dict]) -> float:
    """Largest first-token logprob difference over the tokens both top-10 lists hold."""
    gaps = []
    for x, y in zip(a, b):
        theirs = first_logprobs(y)
        gaps += [abs(lp - theirs[t]) for t, lp in first_logprobs(x).items() if t in theirs]
    return max(gaps)


# ----------------------------------------------------------------- 1. check
def check(tokenizer: Path, logs: Path, model: str | None = None, engine_attention: str = "auto") -> list[str]:
    """`model`: an engine model name or folder (real weights, e.g. qwen2.5-0.5b unpacked by
    ../shared/gpu-kit/weights.sh); none: the small random checkpoint. `engine_attention`: the
    in-process engine's backend (torch: its reference, which compiles nothing for a new shape)."""
    from epic_sglang import Engine, Request, SamplingParams
    from epic_sglang.models.loader import resolve_model_dir

    ckpt = resolve_model_dir(model) if model else small_checkpoint(tokenizer)
    prompts = check_prompts(json.loads((ckpt / "config.json").read_text())["vocab_size"])
    flags = ["--dtype", "bfloat16", "--mem-fraction-static", "0.5"]
    sinks = sink_tokens(ckpt)

    with SGLangServer(ckpt, PORT, plugin=False, extra=flags, log_path=logs / "sglang_plain.log") as url:
        plain = [generate(url, client.generate_body(p, "fr", GREEDY))["output_ids"] for p in prompts]
    with SGLangServer(ckpt, PORT, plugin=True, extra=flags, log_path=logs / "sglang_epic.log") as url:
        linked = plugin_outputs(url, prompts, sinks)
    fr = [o["output_ids"] for o in linked["fr"]]

    engine = Engine(str(ckpt), device="cuda", kv_cache_gb=1, attention=engine_attention)
    rows = [f"| fr: plugin server = plain SGLang server, token for token | {sum(a == b for a, b in zip(fr, plain))}/{len(prompts)} |"]
    for policy in ("fr", "legolink-16", "naive", "legolink0", "cacheblend-15", "querylink-16"):
        ours = engine.generate_batch([Request(segments=p, policy=policy, return_first_logits=True,
                                              sampling=SamplingParams(max_new_tokens=16, ignore_eos=True))
                                      for p in prompts])
        gaps, same_tokens, reused = [], 0, True
        for p, sg, en in zip(prompts, linked[policy], ours):
            lp = torch.log_softmax(en.first_logits.float(), dim=-1)
            gaps += [abs(v - lp[t].item()) for t, v in first_logprobs(sg).items()]
            same_tokens += sg["output_ids"] == en.output_ids
            reused &= policy == "fr" or client.reused_whole(p, policy, sg["meta_info"]["cached_tokens"])
        again = sum(a["output_ids"] == b["output_ids"] for a, b in zip(linked[policy], linked[policy + "-again"])
                    ) if policy == "legolink-16" else None
        rows.append(f"| {policy}: plugin vs in-process engine, max abs first-token logprob gap over SGLang's top-10 "
                    f"| {max(gaps):.4f} |")
        rows.append(f"| {policy}: same 16 greedy tokens as the in-process engine | {same_tokens}/{len(prompts)} |")
        if policy != "fr":
            rows.append(f"| {policy}: documents' KV reused (cached_tokens) | {'yes' if reused else 'NO'} |")
        if again is not None:
            rows.append(f"| {policy}: asked again (exact prefix now cached), same tokens | {again}/{len(prompts)} |")
    for r in rows:
        print(r, flush=True)
    return rows


# ----------------------------------------------------------------- tensor parallel
def tensor_parallel(tokenizer: Path, logs: Path, tp: int) -> list[str]:
    """The same link requests on plugin servers with --tp 1 and --tp `tp` (each rank holds
    its heads' share of every document's KV and links it in its own scheduler)."""
    ckpt, prompts = small_checkpoint(tokenizer), check_prompts(SMALL["vocab_size"])
    flags = ["--dtype", "bfloat16", "--mem-fraction-static", "0.5", "--cuda-graph-max-bs", "8"]
    sinks, outs = sink_tokens(ckpt), {}
    for size in (1, tp):
        with SGLangServer(ckpt, PORT, plugin=True, extra=flags + ["--tp", str(size)],
                          log_path=logs / f"sglang_tp{size}.log") as url:
            outs[size] = plugin_outputs(url, prompts, sinks)
    rows = []
    for policy in ("fr", "legolink-16", "naive", "legolink-16-again", "cacheblend-15", "querylink-16", "legolink0"):
        one, many = outs[1][policy], outs[tp][policy]
        same = sum(a["output_ids"] == b["output_ids"] for a, b in zip(one, many))
        cached = min(o["meta_info"]["cached_tokens"] for o in many)
        rows.append(f"| {policy} | {max_logprob_gap(one, many):.4f} | {same}/{len(prompts)} | {cached} |")
    for r in rows:
        print(r, flush=True)
    return rows


# ----------------------------------------------------------------- front
def front(tokenizer: Path, logs: Path) -> list[str]:
    """`epic-sglang serve --engine sglang` as a user runs it: our API in front of SGLang with
    the plugin, on a small checkpoint (random weights). Documents by text on the OpenAI chat
    route (retrieval's embedder is not on the GPU host, so /v1/rag is covered on CPU only)."""
    import signal
    import subprocess

    from transformers import AutoTokenizer

    from epic_sglang.prompt import PromptBuilder

    ckpt = small_checkpoint(tokenizer)
    url, sglang_url = f"http://127.0.0.1:{PORT + 1}", f"http://127.0.0.1:{PORT}"
    cmd = [sys.executable, "-m", "epic_sglang.cli", "serve", "--engine", "sglang", "--model", str(ckpt),
           "--port", str(PORT + 1), "--sglang-port", str(PORT), "--log-level", "warning",
           "--sglang-args", "--cuda-graph-max-bs 8 --mem-fraction-static 0.5"]
    log = open(logs / "sglang_front.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    words = "river stone lantern orchard copper falcon meadow harbor violet thunder".split()
    texts = [f"Document {i}: " + " ".join(random.Random(i).choices(words, k=90)) for i in range(4)]
    rows = []
    try:
        wait_until_ready(proc, url, 900, "serve --engine sglang (log: sglang_front.log)")
        health = requests.get(url + "/health_generate", timeout=60).json()
        rows.append(f"| /health_generate through the front and SGLang | {health} |")

        def chat(system: str) -> dict:
            body = {"model": "m", "messages": [{"role": "system", "content": system},
                                               {"role": "user", "content": "Which word comes first?"}],
                    "documents": texts, "max_tokens": 16, "temperature": 0, "policy": "legolink-16",
                    "logprobs": True, "top_logprobs": 2}
            r = requests.post(url + "/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            return r.json()

        tok = AutoTokenizer.from_pretrained(ckpt)
        builder = PromptBuilder(tok)
        doc_tokens = sum(len(builder.encode_document(t)) for t in texts)
        first, second = chat("You answer from the documents."), chat("Be terse. Use the documents.")
        rows.append(f"| first chat: documents compiled through SGLang (compiled / documents' tokens) | "
                    f"{first['epic']['compiled_tokens']} / {doc_tokens} |")
        rows.append(f"| second chat, new system prompt: compiled, reused (SGLang cached_tokens) | "
                    f"{second['epic']['compiled_tokens']}, {second['epic']['reused_tokens']} "
                    f"(documents less 16 per document: {doc_tokens - 16 * len(texts)}) |")
        segs = builder.build("Which word comes first?", texts, "Be terse. Use the documents.")
        direct = generate(sglang_url, client.generate_body(segs, "legolink-16", {**GREEDY, "ignore_eos": False},
                                                           return_logprob=True, top_logprobs_num=2))
        same = tok.decode(direct["output_ids"], skip_special_tokens=True) == second["choices"][0]["message"]["content"]
        rows.append(f"| front's answer = the same link request sent to SGLang directly | {'yes' if same else 'NO'} |")
        ours = [c["logprob"] for c in second["choices"][0]["logprobs"]["content"]]
        theirs = [lp for lp, _, _ in direct["meta_info"]["output_token_logprobs"]]
        gap = max(abs(a - b) for a, b in zip(ours, theirs))
        rows.append(f"| front's token logprobs vs SGLang's own for that request: tokens, max abs gap | "
                    f"{len(ours)} / {len(theirs)}, {gap:.4f} |")
        # prompt logprobs: the front sends the exact prompt as fr; SGLang asked directly gives the same
        ids = [t for seg in segs for t in seg.token_ids]
        scoring = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
                   "logprob_start_len": len(ids) // 2}
        via_front = requests.post(url + "/generate", json=scoring, timeout=600).json()["meta_info"]
        via_sglang = generate(sglang_url, scoring)["meta_info"]
        pairs = list(zip(via_front["input_token_logprobs"], via_sglang["input_token_logprobs"]))
        gap = max(abs(a[0] - b[0]) for a, b in pairs if a[0] is not None)
        rows.append(f"| prompt logprobs through the front (sent as {via_front['policy']}) vs SGLang's own: "
                    f"positions, max abs gap | {len(pairs)} / {len(ids) - len(ids) // 2}, {gap:.4f} |")
        bad = requests.post(url + "/v1/chat/completions", json={**{"model": "m", "documents": texts},
                            "messages": [{"role": "user", "content": "Q?"}], "policy": "cacheblend-15"}, timeout=60)
        rows.append(f"| unsupported policy (cacheblend-15) | {bad.status_code}: {bad.json()['error']['message'][:60]} |")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    left = "yes" if _listening(sglang_url) else "no"
    rows.append(f"| SIGTERM to the front: exit code, SGLang left running | {proc.returncode}, {left} |")
    for r in rows:
        print(r, flush=True)
    return rows


def _listening(url: str) -> bool:
    try:
        requests.get(url + "/health", timeout=5)
        return True
    except requests.RequestException:
        return False


# ----------------------------------------------------------------- 2. speed
def timed(url: str, body: dict) -> float:
    t0 = time.perf_counter()
    generate(url, body)
    return time.perf_counter() - t0


def prompt(docs: list[Segment], seed: int, head: int = 32, question: int = 64) -> list[Segment]:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: tuple(torch.randint(100, LLAMA_8B["vocab_size"], (n,), generator=g).tolist())  # noqa: E731
    return [Segment(ids(head))] + docs + [Segment(ids(question))]


def batch_seconds(url: str, bodies: list[dict]) -> float:
    """Wall time of `bodies` sent at once."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        list(pool.map(lambda b: generate(url, b), bodies))
    return time.perf_counter() - t0


def decode_step_ms(url: str, bodies_of, batch: int, steps: int = 64) -> float:
    """Per-step decode time of `batch` concurrent requests: (time of 1 + `steps` tokens - time
    of 1 token) / steps, each the median of three; `bodies_of(params, round)` builds the batch."""
    def timed_batch(tokens: int, round_: int) -> float:
        params = {"max_new_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
        return batch_seconds(url, bodies_of(params, round_))
    timed_batch(1 + steps, -1)  # warm-up (the CUDA graph of this batch size)
    one = statistics.median(timed_batch(1, r) for r in range(3))
    many = statistics.median(timed_batch(1 + steps, 3 + r) for r in range(3))
    return (many - one) / steps * 1000


def decode(url: str, docs: list[Segment], batches: list[int], seed: int) -> list[str]:
    """SGLang's decode over its own exact KV (requests sharing one cached prefix: the same
    documents, each its own question) against linked requests over the same documents read in
    place (legolink-16, each its own head and question), and the KV slots each linked request
    holds (its row: SGLang's `prompt_tokens` + the generated tokens)."""
    ctx = sum(len(d) for d in docs) + 32 + 64
    base = prompt(docs, seed)
    generate(url, client.generate_body(base, "fr", {"max_new_tokens": 1}))  # the exact prefix, cached
    rows = []
    for batch in batches:
        exact = decode_step_ms(url, lambda params, r: [client.generate_body(
            base[:-1] + prompt([], seed + 100 * r + i)[-1:], "fr", params) for i in range(batch)], batch)
        linked = decode_step_ms(url, lambda params, r: [client.generate_body(
            prompt(docs, seed + 10_000 + 100 * r + i), "legolink-16", params) for i in range(batch)], batch)
        rows.append(f"| {ctx:,} | {batch} | {exact:.2f} | {linked:.2f} | {linked / exact:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def private_slots(url: str, docs: list[Segment], seed: int) -> str:
    segs = prompt(docs, seed)
    out = generate(url, client.generate_body(segs, "legolink-16", {"max_new_tokens": 16, "ignore_eos": True}))
    meta, n = out["meta_info"], sum(len(s) for s in segs)
    return (f"| {n:,} | {n - meta['cached_tokens']:,} | {meta['prompt_tokens']:,} | {meta['completion_tokens']} | "
            f"{meta['prompt_tokens'] + meta['completion_tokens']:,} |")


def speed(tokenizer: Path, logs: Path, contexts: list[int], repeats: int,
          decode_batches: list[int]) -> tuple[list[str], list[str], list[str]]:
    one = {"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True}
    rows, decode_rows, slot_rows = [], [], []
    flags = ["--load-format", "dummy", "--dtype", "bfloat16", "--context-length", str(max(contexts) + 2048),
             "--mem-fraction-static", "0.85", "--cuda-graph-max-bs", str(max([16, *decode_batches]))]
    with SGLangServer(model_dir(LLAMA_8B, tokenizer), PORT, plugin=True, extra=flags,
                      log_path=logs / "sglang_speed.log") as url:
        seed = 1000
        for ctx in contexts:
            n_docs = (ctx - 32 - 64) // 512
            docs = [s for s in segments(n_docs, 512, 0, 0, LLAMA_8B["vocab_size"], seed=ctx) if s.document is not None]
            compile_documents(url, docs)
            t = {k: [] for k in ("fr", "hit", "legolink-16", "naive", "querylink-16")}
            for i in range(repeats + 2):  # two warm-ups
                seed += 1
                base = prompt(docs, seed)
                miss = timed(url, client.generate_body(base, "fr", one))
                hit = timed(url, client.generate_body(base[:-1] + prompt([], seed + 10_000)[-1:], "fr", one))
                lego = timed(url, client.generate_body(prompt(docs, seed + 20_000), "legolink-16", one))
                naive = timed(url, client.generate_body(prompt(docs, seed + 30_000), "naive", one))
                query = timed(url, client.generate_body(prompt(docs, seed + 60_000), "querylink-16", one))
                if i >= 2:
                    for k, v in zip(t, (miss, hit, lego, naive, query)):
                        t[k].append(v)
            m = {k: statistics.median(v) * 1000 for k, v in t.items()}
            rows.append(f"| {ctx:,} | {n_docs} | {m['fr']:,.1f} | {m['hit']:,.1f} | {m['legolink-16']:,.1f} | "
                        f"{m['naive']:,.1f} | {m['querylink-16']:,.1f} ({m['querylink-16'] / m['legolink-16']:.2f}x) | "
                        f"{m['fr'] / m['legolink-16']:.1f}x | {m['legolink-16'] / m['hit']:.2f}x |")
            print(rows[-1], flush=True)
            slot_rows.append(private_slots(url, docs, seed + 40_000))
            print(slot_rows[-1], flush=True)
            if ctx == max(contexts) and decode_batches:
                decode_rows = decode(url, docs, decode_batches, seed + 50_000)
            requests.post(url + "/flush_cache", timeout=60)
    return rows, decode_rows, slot_rows


# ----------------------------------------------------------------- 3. load
class RagLoad:
    """RAG requests over a corpus: 8 documents drawn by Zipf popularity, a shared system
    head, a fresh 64-token question, 32 output tokens, streamed (TTFT = first chunk)."""

    def __init__(self, url: str, corpus: list[Segment], policy: str, seed: int):
        self.url, self.corpus, self.policy = url, corpus, policy
        self.rng = random.Random(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.head = Segment(tuple(range(200, 232)))
        weights = [1 / (i + 1) for i in range(len(corpus))]  # Zipf, s = 1
        self.weights = weights
        self.compiled = client.CompiledDocuments()
        self.lock = threading.Lock()
        self.compiled_on_clock = 0  # documents compiled during a run (never compiled, or evicted)
        self.served, self.all_resident = 0, 0  # linked requests; those that found every document cached
        self.compiler = ThreadPoolExecutor(max_workers=32)
        self.trace: list[dict] = []  # per request: when it was sent, compiled, answered (s from the run's start)

    def compile(self, docs: list[Segment], on_clock: bool = True) -> None:
        """Compile documents concurrently (SGLang batches their prefills)."""
        with self.lock:
            docs = self.compiled.missing(docs)
            self.compiled.add(docs)
            self.compiled_on_clock += len(docs) if on_clock else 0
        list(self.compiler.map(lambda body: generate(self.url, body), client.compile_bodies(docs)))

    def precompile(self, count: int) -> None:
        """The `count` most popular documents, as ingestion would (the corpus is ranked by
        popularity), the least popular first: where the pool holds fewer, the cache evicts the
        least recently used, so the most popular must come last to stay."""
        self.compile(self.corpus[:count][::-1], on_clock=False)

    def resident(self) -> int:
        """How many corpus documents the server holds: each linked alone (naive, one new
        token after it); a held one is reused whole (`cached_tokens`), a missing one is
        computed in the probe's row and not kept. Least popular first, as `precompile`: a
        probe is a use, and the most popular should be the last used when the run starts."""
        probe = Segment((7,))
        prompts = [[doc, probe] for doc in reversed(self.corpus)]
        out = self.compiler.map(lambda segs: generate(self.url, client.generate_body(segs, "naive", {"max_new_tokens": 1})),
                                prompts)
        return sum(client.reused_whole(segs, "naive", o["meta_info"]["cached_tokens"]) for o, segs in zip(out, prompts))

    def prompt(self) -> list[Segment]:
        picked: list[int] = []
        while len(picked) < 8:
            i = self.rng.choices(range(len(self.corpus)), self.weights)[0]
            if i not in picked:
                picked.append(i)
        question = Segment(tuple(torch.randint(100, LLAMA_8B["vocab_size"], (64,), generator=self.g).tolist()))
        return [self.head] + [self.corpus[i] for i in picked] + [question]

    def one(self, segs: list[Segment], run_start: float, label: str) -> float:
        params = {"max_new_tokens": OUTPUT_TOKENS, "temperature": 0.0, "ignore_eos": True}
        t0 = time.perf_counter()  # a document not compiled yet (or evicted) is compiled on the clock
        if self.policy != "fr":
            self.compile(segs)
        compiled = time.perf_counter()
        ttft, last = None, None
        with requests.post(self.url + "/generate", json=client.generate_body(segs, self.policy, params, stream=True),
                           stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data:") and line != b"data: [DONE]":
                    ttft = ttft or time.perf_counter() - t0
                    last = line
        meta = json.loads(last[5:])["meta_info"]
        with self.lock:
            self.trace.append({"run": label, "sent": round(t0 - run_start, 4), "compiled": round(compiled - t0, 4),
                               "ttft": round(ttft, 4), "done": round(time.perf_counter() - t0, 4),
                               "prompt_tokens": meta["prompt_tokens"], "cached_tokens": meta["cached_tokens"]})
            if self.policy != "fr":
                self.served += 1
                self.all_resident += self.compiled.confirm(segs, self.policy, meta["cached_tokens"])
        return ttft

    def run(self, rate: float, n: int, label: str) -> tuple[float, float, float, float]:
        """(p50 TTFT s, p90 TTFT s, achieved requests/s, steady completions/s: `load_trace.steady_rate`)
        for n Poisson arrivals at `rate`."""
        prompts = [self.prompt() for _ in range(n)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=256) as pool:
            futures = []
            for segs in prompts:
                futures.append(pool.submit(self.one, segs, t0, label))
                time.sleep(self.rng.expovariate(rate))
            ttfts = [f.result() for f in futures]
        wall = time.perf_counter() - t0
        steady = steady_rate([t for t in self.trace if t["run"] == label])
        return statistics.median(ttfts), percentile(ttfts, 0.9), n / wall, steady


def profiled_run(url: str, runner: RagLoad, rate: float, n: int, label: str, out: Path,
                 activity: str) -> tuple[float, float, float]:
    """One more run at `rate` between /start_profile (`activity` only, into `out`) and
    /stop_profile: (p50 TTFT s, p90 TTFT s, achieved requests/s)."""
    requests.post(url + "/start_profile", json={"output_dir": str(out), "activities": [activity]},
                  timeout=120).raise_for_status()
    p50, p90, achieved, _ = runner.run(rate, n, label)
    requests.post(url + "/stop_profile", timeout=600).raise_for_status()
    return p50, p90, achieved


def profile_run(url: str, runner: RagLoad, rate: float, n: int, label: str, out: Path) -> str:
    """One more run at `rate` under SGLang's profiler (GPU activity only): how much of it the GPU was busy."""
    p50, p90, achieved = profiled_run(url, runner, rate, n, label, out, "GPU")
    traces = sorted(out.rglob("*.trace.json.gz"), key=lambda t: t.stat().st_mtime)
    if not traces:
        return f"The profiled run at {rate:g} req/s left no trace under {out}."
    busy, span, kernels = kernel_busy(complete_events(traces[-1]))
    return (f"Under SGLang's profiler (GPU activity only), one more run at {rate:g} req/s ({achieved:.2f} achieved, "
            f"TTFT p50 / p90 {p50 * 1000:,.0f} / {p90 * 1000:,.0f} ms): some kernel ran {busy / 1000:,.0f} ms of the "
            f"{span / 1000:,.0f} ms from its first kernel to its last ({busy / span:.0%}; {kernels:,} kernels).")


def host_profile_run(url: str, runner: RagLoad, rate: float, n: int, label: str, out: Path) -> list[str]:
    """One more run at `rate` with the scheduler thread's stacks sampled (the plugin's
    activities ["HOST"], `sglang_plugin/host_profile.py`): the report's lines, where its time went."""
    p50, p90, achieved = profiled_run(url, runner, rate, n, label, out, host_profile.HOST)
    report = (out / "host-profile.txt").read_text().splitlines()
    return [f"Run `{label}`, the scheduler thread sampled ({achieved:.2f} achieved, TTFT p50 / p90 "
            f"{p50 * 1000:,.0f} / {p90 * 1000:,.0f} ms; folded stacks in {out.name}/host-profile.folded):", "",
            "```", *report, "```", ""]


def plugin_environment() -> str:
    """The plugin's settings this process hands its servers (EPIC_SGLANG_* in the environment)."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("EPIC_SGLANG_")]
    return f" (server environment: {', '.join(settings)})" if settings else ""


def prefill_graphs_note(log: str) -> str:
    """Whether the server started SGLang's prefill graphs (EPIC_SGLANG_PREFILL_GRAPHS=1), from its log."""
    if m := re.search(r"Capture target prefill CUDA graph end\. elapsed=([\d.]+) s, mem usage=([\d.]+) GB", log):
        return f"SGLang's prefill CUDA graphs were captured ({float(m[1]):.0f} s, {m[2]} GB)."
    if m := re.search(r"Disabling auto-selected prefill CUDA graph[^\n]*", log):
        return f"SGLang did not start its prefill CUDA graphs: {m[0]}"
    return "SGLang's prefill CUDA graphs were off."


def plugin_settings(variant: str) -> dict[str, str]:
    """A `--load-variants` string: NAME=VALUE words, or "-" for the plugin's defaults."""
    if bad := [w for w in variant.split() if w != "-" and "=" not in w]:
        raise ValueError(f"--load-variants takes NAME=VALUE words or '-', got {bad[0]!r}")
    return dict(word.split("=", 1) for word in variant.split() if word != "-")


def load(tokenizer: Path, logs: Path, rates: dict[str, list[float]], n: int, seconds: float, slo_s: float,
         precompiled: int, server_flags: list[str], variant: str,
         profile_rate: float | None = None) -> tuple[list[str], dict[str, float], str, list[str], list[str]]:
    """One server (its plugin settings: `variant`, NAME=VALUE words or "-" for the defaults) under
    each policy's rates; rows and runs are named by the policy and the variant. `profile_rate`:
    after its rates, the linked policy runs once more at that rate under SGLang's profiler (GPU
    activity only), to tell a busy GPU from one waiting on the scheduler's host work, and once
    more with the scheduler thread sampled, to say where that host work goes (returned last)."""
    plugin_env = plugin_settings(variant)
    suffix = f" ({variant})" if plugin_env else ""
    # a forward stuck for 20 s dumps the scheduler's stack into the log; SGLang's idle check of
    # the pool's accounting warns (counted below) instead of stopping the server mid-run
    flags = ["--load-format", "dummy", "--dtype", "bfloat16", "--context-length", "8192",
             "--mem-fraction-static", "0.85", "--cuda-graph-max-bs", "128", "--soft-watchdog-timeout", "20",
             *server_flags]
    env = {**server_env(plugin=True), "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "0", **plugin_env}
    corpus = [s for s in segments(1000, 512, 0, 0, LLAMA_8B["vocab_size"], seed=7) if s.document is not None]
    rows, best, runners, host = [], {}, [], []
    tag = "".join(f"-{k.removeprefix('EPIC_SGLANG_').lower()}-{v}" for k, v in plugin_env.items())  # the files' suffix
    log_path, trace_path = logs / f"sglang_load{tag}.log", logs / f"load_trace{tag}.jsonl"
    with SGLangServer(model_dir(LLAMA_8B, tokenizer), PORT, plugin=True, extra=flags, log_path=log_path, env=env) as url:
        for policy, policy_rates in rates.items():
            runner = RagLoad(url, corpus, policy, seed=11)
            runners.append(runner)
            if policy != "fr":
                runner.precompile(precompiled)
                held = runner.resident()
                linked = runner
            mode = "SGLang prefix caching (fr)" if policy == "fr" else policy + suffix
            best.setdefault(mode, 0.0)  # a mode that passes no rate is reported at 0
            runner.run(policy_rates[0], 16, f"{policy}{suffix} warm-up")
            write_trace(trace_path, [r.trace for r in runners])
            for rate in policy_rates:
                p50, p90, achieved, steady = runner.run(rate, max(n, math.ceil(rate * seconds)), f"{policy}{suffix} {rate:g}")
                write_trace(trace_path, [r.trace for r in runners])
                ok = p90 <= slo_s
                rows.append(f"| {mode} | {rate:g} | {achieved:.2f} | {steady:.1f} | "
                            f"{p50 * 1000:,.0f} | {p90 * 1000:,.0f} | {'yes' if ok else 'no'} |")
                print(rows[-1], flush=True)
                if ok:
                    best[mode] = max(best.get(mode, 0.0), achieved)
                else:
                    break
            if policy != "fr" and profile_rate:
                profiled_n = max(n, math.ceil(profile_rate * seconds))
                profiled = profile_run(url, runner, profile_rate, profiled_n,
                                       f"{policy}{suffix} {profile_rate:g} (profiled)", logs / f"load-profile{tag}")
                host = host_profile_run(url, runner, profile_rate, profiled_n,
                                        f"{policy}{suffix} {profile_rate:g} (host sampled)", logs / f"load-host{tag}")
                write_trace(trace_path, [r.trace for r in runners])
    log = log_path.read_text()
    leaks = log.count("memory leak detected")
    residency = (f"Server{suffix}: after the precompile, {held} of the {len(corpus)} documents were resident (probed by linking "
                 f"each alone with naive: a held one comes back reused whole). Of {linked.served} linked requests, {linked.all_resident} found all 8 documents resident; "
                 f"{linked.compiled_on_clock} documents were compiled on the clock after the precompile. "
                 f"SGLang's idle check of the pool's accounting reported {leaks} leak(s) over the run. {prefill_graphs_note(log)}"
                 + (f" {profiled}" if profile_rate else ""))
    return rows, best, residency, trace_rows(trace_path), host


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (vocab 49,152); every part needs it")
    ap.add_argument("--part", choices=["check", "front", "tp", "speed", "load", "all"], nargs="+", default=["all"])
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the tp part")
    ap.add_argument("--model", help="the check part on real weights: an engine model name or folder")
    ap.add_argument("--engine-attention", choices=["auto", "torch"], default="auto",
                    help="the check part's in-process engine: torch = its reference attention (on a model shape "
                         "FlashInfer has not compiled for, auto had not finished after 3.5 minutes on a fresh H100)")
    ap.add_argument("--requests", type=int, default=48, help="fewest requests per load rate")
    ap.add_argument("--seconds", type=float, default=4.0,
                    help="a load rate runs at least this long (rate x seconds requests), so its queue reaches steady state")
    ap.add_argument("--fr-rates", type=float, nargs="*", default=[1, 2, 3, 4], help="none: skip fr")
    ap.add_argument("--load-flags", default="", help="more SGLang server flags for the load part, one string given "
                    "with '=' (e.g. --load-flags=\"--enable-prefill-delayer --prefill-delayer-queue-min-ratio 0.25\": "
                    "fewer, larger link-pass forwards)")
    ap.add_argument("--load-variants", nargs="+", default=["-"], metavar="SETTINGS",
                    help="the load part: one server after another, each with these plugin settings, one string of "
                         "NAME=VALUE words ('-': the defaults), e.g. - EPIC_SGLANG_MAX_CONSECUTIVE_PREFILLS=1; "
                         "fr runs on the first only")
    ap.add_argument("--tag", help="BENCHMARKS.md section suffix of the load and check parts, so a variant run keeps the "
                    "main table")
    ap.add_argument("--profile-rate", type=float, help="the load part: after each server's rates, two more linked runs "
                    "at this rate: under SGLang's profiler (how busy the GPU was), then with the scheduler thread "
                    "sampled (where its host time went)")
    ap.add_argument("--precompile", type=int, default=1000, help="most popular documents compiled before the run")
    ap.add_argument("--epic-rates", type=float, nargs="+", default=[16, 32, 48, 64, 96, 128])
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8, 32],
                    help="decode batch sizes timed at the largest context (none: skip)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--link-attention", choices=["shared", "gathered"], nargs="+", default=["shared"],
                    help="the speed part: one server per way link passes attend (EPIC_SGLANG_LINK_ATTENTION)")
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--summarize-trace", type=Path, metavar="FILE",
                    help="print where the TTFT went in a load part's load_trace.jsonl, and stop")
    args = ap.parse_args()
    if args.summarize_trace:
        print(TRACE_HEADER)
        print("\n".join(trace_rows(args.summarize_trace)))
        return
    if args.tokenizer is None:
        ap.error("--tokenizer DIR is required (a folder with tokenizer.json)")
    for variant in args.load_variants:  # every server's settings checked before the first starts
        try:
            plugin_settings(variant)
        except ValueError as e:
            ap.error(str(e))
    everything = {"check", "front", "speed", "load"} | ({"tp"} if torch.cuda.device_count() >= args.tp else set())
    parts = everything if "all" in args.part else set(args.part)
    if "check" in parts:
        rows = check(args.tokenizer, args.logs, args.model, args.engine_attention)
        weights = (f"{args.model}, real weights, random-token prompts" if args.model
                   else "small Qwen2 checkpoint, random widened weights")
        tolerance = ("" if args.model else "; the widened weights (std 0.08) make logits peaky and amplify it")
        write_section("sglang-plugin-check" + (f"-{args.model}" if args.model else "") + (f"-{args.tag}" if args.tag else ""),
                      f"""## SGLang plugin on GPU: correctness ({weights}, bf16){f" ({args.tag})" if args.tag else ""}

Card: {machine()}. SGLang 0.5.16, FlashInfer attention, `--radix-cache-backend epic` vs no plugin{plugin_environment()};
the in-process engine with {"its torch reference attention" if args.engine_attention == "torch" else "FlashInfer"}.

Six prompts of 4 x 120-token documents, a 16-token head and a 24-token question; 16 greedy tokens.
The two runtimes use different kernels (SGLang stores rotated keys and the plugin reads documents in
place, rotating each cached run's queries back by the run's shift in fp32, rounded to bf16; the in-process
engine rotates in FlashInfer's fused RoPE), so fr's
gap between them is the bf16 tolerance{tolerance}.

| check | result |
|---|---|
{chr(10).join(rows)}
""")
    if "front" in parts:
        rows = front(args.tokenizer, args.logs)
        write_section("sglang-front", f"""## `epic-sglang serve --engine sglang` on GPU: our API in front of SGLang with the plugin

Card: {machine()}. Small Qwen2 checkpoint (random widened weights); 4 documents of ~100 tokens
on the OpenAI chat route (`documents`), legolink-16, 16 greedy tokens.

| check | result |
|---|---|
{chr(10).join(rows)}
""")
    if "tp" in parts:
        rows = tensor_parallel(args.tokenizer, args.logs, args.tp)
        write_section("sglang-plugin-tp", f"""## SGLang plugin on GPU: tensor parallelism (small Qwen2 checkpoint, random widened weights, bf16)

Cards: {torch.cuda.device_count()} x {machine()}. The same six prompts as the correctness check (4 x 120-token documents, 16 greedy
tokens) on two plugin servers, `--tp 1` and `--tp {args.tp}`. Each rank's scheduler holds its share of
the heads of every document's KV and links it itself. Tensor parallelism changes the order of bf16
reductions, so fr's own gap between the two servers is the tolerance the linked policies are read against.

| policy | max abs first-token logprob gap, tp {args.tp} vs tp 1 | same 16 greedy tokens | min cached_tokens on tp {args.tp} |
|---|---|---|---|
{chr(10).join(rows)}
""")
    for mode in args.link_attention if "speed" in parts else []:
        os.environ["EPIC_SGLANG_LINK_ATTENTION"] = mode  # the server's environment (`launch.server_env`)
        try:
            rows, decode_rows, slot_rows = speed(args.tokenizer, args.logs, args.contexts, args.repeats,
                                                 args.decode_batches)
        finally:  # the parts after this one run their servers as the plugin's default
            del os.environ["EPIC_SGLANG_LINK_ATTENTION"]
        gathered = mode == "gathered"
        write_section("sglang-plugin-speed" + ("-gathered" if gathered else ""),
                      f"""## SGLang plugin on GPU: TTFT over HTTP (Llama-3-8B shape, dummy bf16 weights){" (gathered)" if gathered else ""}

Card: {machine()}. One SGLang 0.5.16 server with the plugin (FlashInfer attention); linked decode
steps {"inside SGLang's decode CUDA graphs" if decode_graphs.enabled() else "eager (EPIC_SGLANG_DECODE_GRAPHS=0)"};
link passes {"over their keys gathered in prompt order (`EPIC_SGLANG_LINK_ATTENTION=gathered`, `gathered.py`)"
             if gathered else "over the documents' shared slots, queries rotated per document (`attention.py`)"}.

512-token documents (compiled through the plugin) + a new 32-token head + a 64-token question;
client-side latency of a 1-token request, median of {args.repeats} after two warm-ups.
prefix hit = SGLang's own exact prefix cache with 64 new tokens (same prompt, another question).

| context | docs | SGLang full prefill ms | SGLang prefix hit ms | legolink-16 ms | naive ms | querylink-16 ms (/ lego) | fr / lego | lego / hit |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

KV slots a linked request holds (legolink-16, 16 generated tokens): its row, SGLang's `prompt_tokens`
(the private prompt tokens: the exact prefix and the recomputed ones) + the generated tokens; the
documents' tokens are read in place from their shared slots.

| prompt tokens | recomputed (prompt - cached_tokens) | row prompt tokens | generated | KV slots held |
|---|---|---|---|---|
{chr(10).join(slot_rows)}

Decode over the documents: per-step time of a batch of concurrent requests, (time for 65 tokens -
time for 1) / 64, median of three. SGLang exact KV = requests sharing one cached exact prefix (the
documents), each its own question (SGLang's decode CUDA graphs); linked = legolink-16 requests over
the same documents read in place, each its own head and question.

| context | batch | SGLang exact KV ms/step | linked, shared documents ms/step | linked / exact |
|---|---|---|---|---|
{chr(10).join(decode_rows)}
""")
    if "load" in parts:
        rows, best, residency, trace, host = [], {}, [], [], []
        for i, variant in enumerate(args.load_variants):
            rates = {"fr": args.fr_rates} if args.fr_rates and i == 0 else {}
            try:
                out = load(args.tokenizer, args.logs, {**rates, "legolink-16": args.epic_rates}, args.requests,
                           args.seconds, 0.2, args.precompile, args.load_flags.split(), variant, args.profile_rate)
            except (RuntimeError, TimeoutError, requests.RequestException) as err:  # the other servers' rows stay
                residency.append(f"Server ({variant}) failed: {err}.")
                print(residency[-1], flush=True)
                continue
            rows += out[0]
            best.update(out[1])
            residency.append(out[2])
            trace += out[3]
            host += out[4]
        fr_best = best.pop("SGLang prefix caching (fr)", 0.0)
        linked_best = ", ".join(f"{mode} {rate:.2f} req/s" + (f" ({rate / fr_best:.1f}x)" if fr_best else "")
                                for mode, rate in best.items()) or "none"
        write_section("sglang-plugin-load" + (f"-{args.tag}" if args.tag else ""), f"""## SGLang plugin on GPU: RAG load (Llama-3-8B shape, dummy bf16 weights){f" ({args.tag})" if args.tag else ""}

Card: {machine()}. SGLang 0.5.16 with the plugin{f" (server flags: `{args.load_flags}`)" if args.load_flags else ""}, one server per
setting of the plugin (a mode's parenthesis; none: the defaults); a corpus of 1,000 documents of 512 tokens;
each request: a shared 32-token head, 8 documents by Zipf popularity (s = 1), a new 64-token question,
32 output tokens, streamed; Poisson arrivals, max({args.requests}, {args.seconds:g} s x rate) requests per rate (after a warm-up of 16).
`fr` requests are plain SGLang (exact prefix caching), run first; then the {args.precompile} most popular
documents are compiled (as ingestion does; the corpus is 512K tokens), and legolink-16 requests link
them in place, compiling on the clock any document the client has not compiled or a response showed
evicted. A rate passes when p90 TTFT <= 200 ms. {" ".join(residency)}

| mode | offered req/s | achieved req/s | completed / s, 2nd half of the arrivals | TTFT p50 ms | TTFT p90 ms | p90 <= 200 ms |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Best rate with p90 TTFT <= 200 ms: SGLang prefix caching {f"{fr_best:.2f} req/s" if args.fr_rates else "not run"};
{linked_best}.

Where the TTFT went, per run (`load_trace*.jsonl`, one per server; `--summarize-trace` prints this from a saved trace):
a request that waited more than {COMPILE_WAIT_S * 1000:g} ms before it was sent had a document compiled on the clock.

{TRACE_HEADER}
{chr(10).join(trace)}
{(chr(10) + "Where the scheduler's host time went (`--profile-rate`):" + chr(10) * 2 + chr(10).join(host)) if host else ""}""")


if __name__ == "__main__":
    main()
