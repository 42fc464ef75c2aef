"""Constrained decoding (regex, JSON schema) with xgrammar, SGLang's default grammar backend.

One `GrammarBackend` per engine compiles grammars (cached by spec); each request gets its
own `Grammar` (a matcher): mask the logits, accept the chosen token, ask if it is done.
"""
from __future__ import annotations

import json
from functools import lru_cache

import torch

from epic_sglang.errors import InvalidRequest


class Grammar:
    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The row with every token the grammar forbids set to -inf (a float32 CPU copy)."""
        logits = logits.float().cpu().clone().unsqueeze(0)
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits[0]

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"grammar rejected token {token} it allowed")

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        import xgrammar as xgr

        info = _tokenizer_info(tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info)
        self._compile = lru_cache(maxsize=256)(self._compile_uncached)

    def _compile_uncached(self, kind: str, spec: str):
        try:
            if kind == "regex":
                return self._compiler.compile_regex(spec)
            json.loads(spec)
            # compact JSON: free whitespace lets small models pad until max_new_tokens runs out
            return self._compiler.compile_json_schema(spec, any_whitespace=False)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError with its parser's message
            raise InvalidRequest(f"cannot compile {kind} {spec[:80]!r}: {str(e).splitlines()[0] if str(e) else e}") from e

    def grammar(self, regex: str | None, json_schema: str | dict | None) -> Grammar | None:
        if regex is None and json_schema is None:
            return None
        if regex is not None:
            return Grammar(self._compile("regex", regex), self.vocab_size)
        spec = json_schema if isinstance(json_schema, str) else json.dumps(json_schema)
        return Grammar(self._compile("json_schema", spec), self.vocab_size)


def _tokenizer_info(tokenizer, vocab_size: int, stop_token_ids: set[int]):
    """xgrammar's view of the vocabulary. Its own `from_huggingface` misreads transformers 5
    tokenizers (GPT-2 byte-level BPE taken for byte-fallback, so spaces never match); the
    decoder in the tokenizer's JSON says which it is."""
    import xgrammar as xgr

    spec = json.loads(tokenizer.backend_tokenizer.to_str())

    def kinds(part: str) -> set[str]:
        d = spec.get(part) or {}
        return {d.get("type")} | {x.get("type") for x in d.get("decoders") or d.get("pretokenizers") or []}

    # transformers 5 decorates byte-level decoders with ByteFallback; the pre-tokenizer is the truth
    if "ByteLevel" in kinds("pre_tokenizer"):
        vocab_type, prefix_space = xgr.VocabType.BYTE_LEVEL, False
    elif "ByteFallback" in kinds("decoder"):
        vocab_type, prefix_space = xgr.VocabType.BYTE_FALLBACK, True
    else:
        vocab_type, prefix_space = xgr.VocabType.RAW, False
    vocab = [""] * vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < vocab_size:
            vocab[i] = token
    return xgr.TokenizerInfo(vocab, vocab_type, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids),
                             add_prefix_space=prefix_space)
