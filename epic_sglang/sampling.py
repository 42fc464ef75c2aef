"""Sampling parameters (SGLang's names and defaults) and next-token choice.

`SamplingParams.from_dict` is the strict door for API input: unknown keys and bad values
raise ValueError with a message a client can act on.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

import torch

from epic_sglang.errors import InvalidRequest

GREEDY_BELOW = 1e-6  # as SGLang: a smaller temperature would overflow the scaled logits; it means greedy
MAX_NEW_TOKENS = 1 << 20  # past any context; keeps later arithmetic (budgets, bounds) in range
# SGLang keys we accept but that do not change our output (tokenizer-side formatting).
_ACCEPTED_NO_EFFECT = {"spaces_between_special_tokens"}


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # stop tokens are masked until this many are generated
    temperature: float = 0.0  # below GREEDY_BELOW = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = no top-k cut
    min_p: float = 0.0
    frequency_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # CTRL / HF semantics, over generated tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    no_stop_trim: bool = False  # keep the matched stop string in the text
    skip_special_tokens: bool = True
    regex: str | None = None  # constrained decoding (xgrammar)
    json_schema: str | None = None
    seed: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        """From an API's `sampling_params`; None values mean "default", as SGLang's frontend sends them."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise InvalidRequest("sampling_params must be a JSON object")
        known = {f.name for f in fields(cls)}
        aliases = {"sampling_seed": "seed"}
        kwargs = {}
        for key, value in d.items():
            key = aliases.get(key, key)
            if key in _ACCEPTED_NO_EFFECT or value is None:
                continue
            if key not in known:
                raise InvalidRequest(f"unknown sampling_params key {key!r}; supported: {', '.join(sorted(known))}")
            kwargs[key] = value
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self) -> None:
        for name in ("stop", "stop_regex"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or any(not isinstance(s, str) or not s for s in value):
                raise InvalidRequest(f"{name} must be a string or a list of non-empty strings")
            setattr(self, name, list(value))
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 1 << 31 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be a list of token ids (integers >= 0)")
        self.stop_token_ids = list(self.stop_token_ids)
        for name in ("max_new_tokens", "min_new_tokens", "top_k"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
        for name in ("ignore_eos", "no_stop_trim", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("regex", "json_schema"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidRequest(f"{name} must be a string")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -(1 << 63) <= self.seed < 1 << 64):
            raise InvalidRequest(f"seed must be an integer in the 64-bit range, got {self.seed!r}")
        if self.max_new_tokens > MAX_NEW_TOKENS:
            raise InvalidRequest(f"max_new_tokens must be at most {MAX_NEW_TOKENS:,}, got {self.max_new_tokens}")
        if self.max_new_tokens < 0:
            raise InvalidRequest(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= max(self.max_new_tokens, 0):
            raise InvalidRequest(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise InvalidRequest(f"top_k must be >= 0 (or -1 for no cut), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.frequency_penalty <= 2 or not -2 <= self.presence_penalty <= 2:
            raise InvalidRequest("frequency_penalty and presence_penalty must be in [-2, 2]")
        if not 0 < self.repetition_penalty <= 2:
            raise InvalidRequest(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.regex is not None and self.json_schema is not None:
            raise InvalidRequest("give regex or json_schema, not both")
        for pattern in self.stop_regex:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidRequest(f"bad stop_regex {pattern!r}: {e}") from e

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed % (1 << 64)) if self.seed is not None else g.seed()  # torch takes [0, 2^64)
        return g


def adjust_logits(logits: torch.Tensor, params: SamplingParams, output_ids: list[int],
                  stop_ids: set[int]) -> torch.Tensor:
    """Penalties and min_new_tokens on one row of logits (float32, CPU copy when changed)."""
    penalize = params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1
    if not penalize and len(output_ids) >= params.min_new_tokens:
        return logits
    logits = logits.float().clone()
    if penalize and output_ids:
        ids, counts = torch.tensor(output_ids, device=logits.device).unique(return_counts=True)
        picked = logits[ids]
        if params.repetition_penalty != 1:
            picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        picked = picked - params.frequency_penalty * counts - params.presence_penalty
        logits[ids] = picked
    if len(output_ids) < params.min_new_tokens and stop_ids:
        logits[torch.tensor(sorted(stop_ids), device=logits.device)] = float("-inf")
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from one row of (already adjusted and masked) logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float().cpu() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.min_p > 0:
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p  # keeps at least the top token
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
