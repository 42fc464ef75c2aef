"""Split text into documents of at most N tokens of the serving model, at paragraph and
sentence boundaries, so that one chunk is exactly one cached KV unit."""
from __future__ import annotations

import re
from dataclasses import dataclass

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


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
    words = [(m.start() + a, m.end() + a) for m in re.finditer(r"\S+", text[a:b])]
    out, (start, end) = [], words[0]
    for ws, we in words[1:]:
        if count_tokens(text[start:we]) > max_tokens:
            out.append((start, end))
            start = ws
        end = we
    out.append((start, end))
    return out
