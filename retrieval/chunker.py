"""Split text into documents of at most N tokens of the serving model, at paragraph and
sentence boundaries, so that one chunk is exactly one cached KV unit. A sentence longer than
that is cut at spaces, and text with no spaces (a long token, Chinese or Japanese) by tokens:
every chunk fits the budget."""
from __future__ import annotations

import re
from dataclasses import dataclass

_PARAGRAPH = re.compile(r"\n\s*\n")
# Latin sentence ends take a space and a capital after them; CJK ones (。！？) need nothing
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])|(?<=[\u3002\uff01\uff1f])")


@dataclass(frozen=True)
class Chunk:
    text: str
    start: int  # character offsets in the source text
    end: int


def _pieces(text: str) -> list[tuple[int, int]]:
    """(start, end) of sentences, paragraph by paragraph; paragraph breaks kept as boundaries."""
    spans, pos = [], 0
    for para in _PARAGRAPH.split(text):
        start = text.index(para, pos) if para else pos
        pos = start + len(para)
        s = 0
        for m in _SENTENCE.finditer(para):
            spans.append((start + s, start + m.start()))
            s = m.end()
        spans.append((start + s, start + len(para)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def chunk_text(text: str, count_tokens, max_tokens: int = 512) -> list[Chunk]:
    """Greedy packing of whole sentences up to `max_tokens`; a sentence longer than that is
    cut at word boundaries."""
    if max_tokens < 8:
        raise ValueError("chunk size must be at least 8 tokens")
    chunks: list[Chunk] = []
    cur: tuple[int, int] | None = None
    for a, b in _pieces(text):
        if cur and count_tokens(text[cur[0]:b]) <= max_tokens:
            cur = (cur[0], b)
            continue
        if cur:
            chunks.append(Chunk(text[cur[0]:cur[1]].strip(), *cur))
        cur = (a, b)
        if count_tokens(text[a:b]) > max_tokens:
            for s, e in _split_long(text, a, b, count_tokens, max_tokens):
                chunks.append(Chunk(text[s:e].strip(), s, e))
            cur = None
    if cur:
        chunks.append(Chunk(text[cur[0]:cur[1]].strip(), *cur))
    return [c for c in chunks if c.text]


def _split_long(text: str, a: int, b: int, count_tokens, max_tokens: int) -> list[tuple[int, int]]:
    """[a, b) in pieces of at most max_tokens: whole words packed greedily, a word longer
    than the budget cut by tokens."""
    out: list[tuple[int, int]] = []
    start = end = None
    for m in re.finditer(r"\S+", text[a:b]):
        ws, we = m.start() + a, m.end() + a
        if count_tokens(text[ws:we]) > max_tokens:
            if start is not None:
                out.append((start, end))
            out += _split_by_tokens(text, ws, we, count_tokens, max_tokens)
            start = None
        elif start is not None and count_tokens(text[start:we]) <= max_tokens:
            end = we
        else:
            if start is not None:
                out.append((start, end))
            start, end = ws, we
    if start is not None:
        out.append((start, end))
    return out


def _split_by_tokens(text: str, a: int, b: int, count_tokens, max_tokens: int) -> list[tuple[int, int]]:
    """[a, b) (no spaces) in pieces of at most max_tokens: each the longest prefix that fits,
    found by bisection over characters (a piece is never empty: one character always fits)."""
    out = []
    while a < b:
        lo, hi = a + 1, b  # the piece [a, lo) fits; find the largest end that does
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_tokens(text[a:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append((a, lo))
        a = lo
    return out
