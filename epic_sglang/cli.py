"""`epic-sglang` command line: generate with any link policy, list models."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from epic_sglang.models.registry import MODELS, ModelNotInstalled


def default_kv_dir() -> Path:
    from epic_sglang.models.loader import cache_root

    return cache_root() / "kv"


def _engine(args: argparse.Namespace):
    """The engine of a command that reuses compiled documents across runs (disk tier on)."""
    from epic_sglang.engine import Engine

    return Engine(model=args.model, device=args.device, kv_dir=None if args.kv_dir == "none" else args.kv_dir)


def _generate(args: argparse.Namespace) -> int:
    from epic_sglang.policies import parse_policy

    parse_policy(args.policy)  # fail before the model loads
    documents = list(args.document or [])
    for path in args.document_file or []:
        try:
            documents.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read document file {path}: {e}") from e
    engine = _engine(args)
    result = engine.generate(args.question, documents, system=args.system, policy=args.policy,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, stop=args.stop or [], seed=args.seed)
    if args.json:
        print(json.dumps({"text": result.text, "output_ids": result.output_ids, "policy": result.policy,
                          "finish_reason": result.finish_reason, "stats": asdict(result.stats)}))
    else:
        print(result.text)
        if args.stats:
            s = result.stats
            print(f"[{result.policy}] prompt={s.prompt_tokens} reused={s.reused_tokens} recomputed={s.recomputed_tokens} "
                  f"compiled={s.compiled_tokens} ttft={s.ttft_s * 1000:.1f}ms", file=sys.stderr)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    import logging

    from retrieval.ingest import ingest, load_tokenizer
    from retrieval.store import DocumentStore

    logging.basicConfig(level=logging.WARNING, format="epic-sglang: warning: %(message)s")
    store = DocumentStore(args.store, args.index)
    report = ingest(args.paths, store, load_tokenizer(args.model),
                    namespace=args.namespace, chunk_tokens=args.chunk_tokens, progress=not args.quiet)
    print(f"ingested {report.files} files ({report.skipped_files} skipped): {report.chunks} chunks, "
          f"{report.added} added, {report.duplicates} duplicates, {report.seconds:.1f}s")
    if report.files == 0:
        print("epic-sglang: error: nothing could be ingested; check the paths and file types", file=sys.stderr)
        return 1
    if args.compile:
        from retrieval.precompile import precompile

        engine = _engine(args)
        done = precompile(store, engine, args.namespace, args.policy, progress=not args.quiet)
        print(f"compiled {done.compiled} documents ({done.tokens} tokens; {done.already} already on disk) "
              f"into {engine.cache.disk.root} in {done.seconds:.1f}s")
    return 0


def _docs(args: argparse.Namespace) -> int:
    from retrieval.store import DocumentStore

    store = DocumentStore(args.store)
    if args.action == "rm":
        if not args.ids:
            raise ValueError("docs rm needs document ids")
        print(f"removed {store.delete(args.ids)} documents")
        return 0
    for d in store.list(args.namespace, limit=args.limit):
        print(f"{d.id}\t{d.namespace}\t{len(d.token_ids)} tokens\t{d.title}\t{d.text[:60]!r}")
    print(f"{store.count(args.namespace)} documents", file=sys.stderr)
    return 0


def _ask(args: argparse.Namespace) -> int:
    from epic_sglang.engine import Request
    from epic_sglang.policies import parse_policy
    from epic_sglang.sampling import SamplingParams
    from retrieval.retriever import Retriever

    parse_policy(args.policy)
    hits = Retriever(args.store).search(args.question, args.top_k, args.namespace)
    if not hits:
        raise ValueError(f"no documents in {args.store}; run epic-sglang ingest first")
    from retrieval.precompile import kv_namespace

    namespaces = {h.document.namespace for h in hits}
    engine = _engine(args)
    result = engine.generate_batch([Request(
        args.question, [h.document.text for h in hits], args.system, args.policy,
        SamplingParams(max_new_tokens=args.max_new_tokens),
        namespace=kv_namespace(namespaces.pop()) if len(namespaces) == 1 else None)])[0]
    print(result.text)
    for h in hits:
        print(f"  [{h.document.id}] {h.score:.3f} {h.document.title}", file=sys.stderr)
    s = result.stats
    print(f"[{result.policy}] prompt={s.prompt_tokens} reused={s.reused_tokens} recomputed={s.recomputed_tokens} "
          f"compiled={s.compiled_tokens} ttft={s.ttft_s * 1000:.0f}ms", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    """The fidelity gate: per policy, F1 against fr with its paired interval and a verdict.
    Exit 0 when every policy passes, 1 when one fails or is inconclusive."""
    from pathlib import Path

    from epic_sglang.engine import Engine
    from epic_sglang.evaluation import (GATE_MARGIN, TASKS, fidelity_gate, markdown_table, run_eval, summarize,
                                        task_examples)
    from epic_sglang.policies import parse_policy

    margin = GATE_MARGIN if args.margin is None else args.margin
    policies = [p for p in args.policies.split(",") if p]
    for p in policies:
        parse_policy(p)  # fail before the model loads
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if margin < 0:
        raise ValueError(f"--margin must be >= 0, got {margin:g}")
    engine = Engine(model=args.model, device=args.device)
    out = Path(args.out or f"runs/eval-{args.task}-{Path(args.model).name}-seed{args.seed}.jsonl")
    examples = task_examples(args.task, args.n, args.seed, engine.tokenizer)
    rows = run_eval(engine, examples, ["fr"] + policies, out, TASKS[args.task], args.max_new_tokens)
    print(markdown_table(summarize(rows)))
    verdicts = fidelity_gate(rows, margin)
    for v in verdicts:
        print(v.line(margin))
    print(f"results: {out} (model {args.model}, task {args.task}, n={args.n}, seed {args.seed})", file=sys.stderr)
    return 0 if all(v.verdict == "pass" for v in verdicts) else 1


def _server_config(args: argparse.Namespace):
    from epic_sglang.server import ServerConfig

    return ServerConfig(
        model=args.model, served_model_name=args.served_model_name, device=args.device, policy=args.policy,
        store=Path(args.store).expanduser() if args.store else None,
        kv_dir=None if args.kv_dir == "none" else Path(args.kv_dir).expanduser(),
        kv_cache_gb=args.kv_cache_gb, host_cache_gb=args.host_cache_gb,
        transparent_documents=not args.no_transparent, api_key=args.api_key, admin_api_key=args.admin_api_key,
        api_keys=Path(args.api_keys).expanduser() if args.api_keys else None,
        max_running=args.max_running, prefill_token_budget=args.prefill_token_budget)


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from epic_sglang.policies import parse_policy
    from epic_sglang.server import create_app, freeze_startup_objects

    parse_policy(args.policy)  # fail before the model loads
    if args.api_keys:
        from epic_sglang.server.access import load_keys

        load_keys(Path(args.api_keys).expanduser())  # a bad key file: one line, before the model loads
    for name in ("port", "sglang_port"):
        port = getattr(args, name)
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"--{name.replace('_', '-')} must be in 1..65535, got {port}")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    if args.engine == "sglang":
        app = _sglang_front(args)
    else:
        app = create_app(_server_config(args))
    freeze_startup_objects()
    print(f"epic-sglang: serving {args.served_model_name or args.model} on http://{args.host}:{args.port} "
          f"(engine {args.engine}, policy {args.policy}, store {args.store or 'none'})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=60)
    return 0


# Flags the front sets on SGLang itself: the plugin needs them as they are.
FRONT_OWNED_SGLANG_FLAGS = ("--model-path", "--model", "--host", "--port", "--attention-backend",
                            "--radix-cache-backend", "--disable-prefill-cuda-graph", "--api-key")


def sglang_server_args(args: argparse.Namespace) -> list[str]:
    """SGLang's flags for `serve --engine sglang`: ours translated, then --sglang-args
    (e.g. "--tp 2 --mem-fraction-static 0.8"), which may not touch the flags the front owns."""
    import shlex

    from epic_sglang.sglang_plugin import prefill_graphs

    prefill_graphs.enabled()  # a bad EPIC_SGLANG_PREFILL_GRAPHS is one line here, before SGLang starts
    user = shlex.split(args.sglang_args or "")
    owned = sorted({a.split("=", 1)[0] for a in user} & set(FRONT_OWNED_SGLANG_FLAGS))
    if owned:
        raise ValueError(f"--sglang-args may not set {', '.join(owned)}: use --model / --sglang-port / --api-key, "
                         "the plugin needs the rest as the front sets them")
    extra = ["--log-level", args.log_level, "--max-running-requests", str(args.max_running),
             "--max-prefill-tokens", str(args.prefill_token_budget)]
    extra += ["--served-model-name", args.served_model_name] if args.served_model_name else []
    return extra + user


def _sglang_front(args: argparse.Namespace):
    """Our API in front of a real SGLang server with the plugin (started here, on 127.0.0.1:
    --sglang-port, stopped when this process exits)."""
    import atexit
    import functools

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from epic_sglang.models.loader import resolve_model_dir
    from epic_sglang.server import create_sglang_front
    from epic_sglang.sglang_plugin.launch import SGLangServer, server_env

    extra = sglang_server_args(args)
    if not torch.cuda.is_available():
        raise RuntimeError("--engine sglang starts a SGLang server, whose kernels need a CUDA GPU; "
                           "use --engine epic (the default) here")
    config = _server_config(args)
    model_dir = resolve_model_dir(args.model)
    port = args.sglang_port or args.port + 1
    server = SGLangServer(model_dir, port, plugin=True, extra=extra,
                          env=server_env(True, config.kv_dir, config.host_cache_gb), api_key=args.api_key)
    url = server.__enter__()
    stop = functools.partial(server.__exit__, None, None, None)
    atexit.register(stop)  # if uvicorn never starts (the app's shutdown stops SGLang otherwise)
    print(f"epic-sglang: SGLang with the epic plugin ready on {url}", file=sys.stderr)
    max_len = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    return create_sglang_front(config, url, AutoTokenizer.from_pretrained(model_dir), max_len, args.api_key, stop)


def _models(_: argparse.Namespace) -> int:
    for spec in MODELS.values():
        try:
            spec.gguf_parts()
            state = "installed"
        except ModelNotInstalled:
            state = f"missing: {spec.pip_install}"
        print(f"{spec.name:14s} {spec.description} [{state}]")
    return 0


def add_kv_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-dir", default=str(default_kv_dir()),
                        help="disk tier of compiled documents, shared by ingest --compile, ask and generate; 'none' = off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epic-sglang", description="Position-Independent Caching for RAG serving")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a question over documents with a link policy")
    gen.add_argument("question")
    gen.add_argument("-d", "--document", action="append", help="document text (repeatable, in order)")
    gen.add_argument("-f", "--document-file", action="append", help="file whose text is one document (repeatable)")
    gen.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    gen.add_argument("--model", default="qwen2.5-0.5b", help=f"one of {', '.join(MODELS)}, a HF folder or a .gguf file")
    gen.add_argument("--policy", default="legolink-16", help="fr | naive | legolink-<k> | legolink0 | cacheblend-<r> | querylink-<k> | querylink-p<r>")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--stats", action="store_true", help="print reuse and TTFT to stderr")
    add_kv_dir(gen)
    gen.set_defaults(func=_generate)

    ing = sub.add_parser("ingest", help="add files (txt, md, html, pdf, jsonl; folders, globs) to a document store")
    ing.add_argument("paths", nargs="+")
    ing.add_argument("--store", required=True, help="store folder (created if missing)")
    ing.add_argument("--model", default="qwen2.5-0.5b", help="serving model whose tokens measure chunks")
    ing.add_argument("--chunk-tokens", type=int, default=512)
    ing.add_argument("--namespace", default="default")
    ing.add_argument("--index", default="auto", help="auto | flat | ivf | hnsw")
    ing.add_argument("--compile", action="store_true", help="precompile every document's KV into the disk tier (resumable)")
    ing.add_argument("--policy", default="legolink-16", help="policy whose compile recipe to use (legolink0 differs)")
    ing.add_argument("--device", default=None)
    ing.add_argument("--quiet", action="store_true", help="no progress bar")
    add_kv_dir(ing)
    ing.set_defaults(func=_ingest)

    docs = sub.add_parser("docs", help="list or remove stored documents")
    docs.add_argument("action", choices=["list", "rm"])
    docs.add_argument("ids", nargs="*", type=int)
    docs.add_argument("--store", required=True)
    docs.add_argument("--namespace", default=None)
    docs.add_argument("--limit", type=int, default=50)
    docs.set_defaults(func=_docs)

    ask = sub.add_parser("ask", help="retrieve documents for a question and answer it (local RAG)")
    ask.add_argument("question")
    ask.add_argument("--store", required=True)
    ask.add_argument("--model", default="qwen2.5-0.5b")
    ask.add_argument("--top-k", type=int, default=5)
    ask.add_argument("--namespace", default=None)
    ask.add_argument("--policy", default="legolink-16")
    ask.add_argument("--system", default="Answer the question from the documents, briefly.")
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--device", default=None)
    add_kv_dir(ask)
    ask.set_defaults(func=_ask)

    ev = sub.add_parser("eval", help="fidelity gate: accuracy of link policies against fr on a model, with verdicts")
    ev.add_argument("--model", default="qwen2.5-0.5b")
    ev.add_argument("--task", choices=["hotpotqa", "needle"], default="hotpotqa")
    ev.add_argument("--n", type=int, default=300, help="questions (seeded sample of HotpotQA dev, or needle cells)")
    ev.add_argument("--policies", default="querylink-p12.5,legolink-16,naive", help="comma-separated; fr always runs")
    ev.add_argument("--margin", type=float, default=None,
                    help="F1 points a policy may lose against fr (default 2): pass when its whole 95%% interval "
                         "is above -margin, fail when below")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (32 hotpotqa, 16 needle)")
    ev.add_argument("--out", default=None, help="JSON-lines results, resumed if present")
    ev.add_argument("--device", default=None)
    ev.set_defaults(func=_eval)

    srv = sub.add_parser("serve", help="HTTP server: SGLang native API, OpenAI API, /v1/rag, /v1/documents, /metrics")
    srv.add_argument("--model", default="qwen2.5-0.5b", help=f"one of {', '.join(MODELS)}, a HF folder or a .gguf file")
    srv.add_argument("--served-model-name", default=None, help="the model name clients see")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=30000)
    srv.add_argument("--policy", default="legolink-16", help="default link policy (requests may name another)")
    srv.add_argument("--store", default=None, help="document store folder (from epic-sglang ingest; created if missing)")
    srv.add_argument("--no-transparent", action="store_true", help="do not look for ingested documents inside prompts")
    srv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route")
    srv.add_argument("--admin-api-key", default=None, help="admin key: every route, /v1/documents and /flush_cache too")
    srv.add_argument("--api-keys", default=None,
                     help='JSON file of tenant keys: [{"key", "name", "namespaces"?, "admin"?}] (README: access control)')
    srv.add_argument("--kv-cache-gb", type=float, default=2.0, help="--engine epic (SGLang sizes its own pool)")
    srv.add_argument("--host-cache-gb", type=float, default=0.0)
    srv.add_argument("--max-running", type=int, default=32)
    srv.add_argument("--prefill-token-budget", type=int, default=8192)
    srv.add_argument("--device", default=None)
    srv.add_argument("--engine", choices=["epic", "sglang"], default="epic",
                     help="epic: the in-process engine (CPU or GPU); sglang: a real SGLang server with the epic "
                          "plugin behind this API (CUDA only; policies fr, naive, legolink-<k>; SGLang's own API "
                          "on --sglang-port)")
    srv.add_argument("--sglang-port", type=int, default=None, help="--engine sglang: SGLang's port (default --port + 1)")
    srv.add_argument("--sglang-args", default=None,
                     help='--engine sglang: more SGLang server flags, one string, e.g. "--tp 2 --mem-fraction-static 0.8"')
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_kv_dir(srv)
    srv.set_defaults(func=_serve)

    models = sub.add_parser("models", help="list bundled models and whether they are installed")
    models.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ModelNotInstalled, RuntimeError) as e:
        print(f"epic-sglang: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
