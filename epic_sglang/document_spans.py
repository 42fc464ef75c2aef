"""A client's prompt -> token segments with document boundaries, so its documents can be linked.

Three ways to say where the documents are:
- explicit spans: `kv_hints.spans`, [start, end) character offsets into the text (token
  offsets for `input_ids` prompts);
- ingested document ids: `kv_hints.doc_ids`; each document's text must occur in the prompt;
- transparent: any ingested document whose exact text occurs in the prompt (no client change).

Each document span is tokenized alone, so its tokens (and cache key) are the same wherever it
appears; when the text is followed by the store's document separator ("\\n\\n") the span
takes it too, so documents precompiled by `ingest --compile` are hit as they are.
"""
from __future__ import annotations

from epic_sglang.errors import InvalidRequest
from epic_sglang.policies import Segment
from epic_sglang.prompt import DOCUMENT_FORMAT

ANCHOR_CHARS = 48  # a document is found by its first characters, then checked in full
SEPARATOR = DOCUMENT_FORMAT.format(text="")


class DocumentIndex:
    """Texts of ingested documents, found inside prompts by an anchor of their first characters."""

    def __init__(self):
        self._by_anchor: dict[str, dict[int, str]] = {}
        self._anchor_of: dict[int, str] = {}

    def add(self, doc_id: int, text: str) -> None:
        if len(text) < ANCHOR_CHARS:
            return  # too short to find without false matches; still usable by explicit hints
        anchor = text[:ANCHOR_CHARS]
        self._by_anchor.setdefault(anchor, {})[doc_id] = text
        self._anchor_of[doc_id] = anchor

    def remove(self, doc_id: int) -> None:
        anchor = self._anchor_of.pop(doc_id, None)
        if anchor is not None:
            self._by_anchor[anchor].pop(doc_id, None)

    def find(self, text: str) -> list[tuple[int, int]]:
        """Non-overlapping [start, end) spans of ingested documents in text, left to right,
        the longest document winning at each start."""
        spans, i = [], 0
        if not self._by_anchor:
            return spans
        while i <= len(text) - ANCHOR_CHARS:
            docs = self._by_anchor.get(text[i:i + ANCHOR_CHARS])
            match = max((len(t) for t in docs.values() if text.startswith(t, i)), default=0) if docs else 0
            if match:
                spans.append((i, i + match))
                i += match
            else:
                i += 1
        return spans


def spans_of_texts(prompt: str, texts: list[str]) -> list[tuple[int, int]]:
    """Where each given document text occurs in the prompt (first occurrence after the previous)."""
    spans, start = [], 0
    for i, t in enumerate(texts):
        at = prompt.find(t, start)
        if at < 0:
            at = prompt.find(t)
        if at < 0:
            raise InvalidRequest(f"document {i} of kv_hints.doc_ids does not occur in the prompt text")
        spans.append((at, at + len(t)))
        start = at + len(t)
    return sorted(spans)


class SegmentBuilder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # What the tokenizer puts before any text (BOS for Llama-style tokenizers), as SGLang's
        # tokenizer manager does with add_special_tokens=True.
        self.leading = tuple(tokenizer.encode("", add_special_tokens=True))

    def from_text(self, text: str, spans: list[tuple[int, int]], leading: bool = True) -> list[Segment]:
        """Segments of text with document spans [start, end) in characters; `leading=False`
        for text that already holds its special tokens (a rendered chat template)."""
        spans = _checked(spans, len(text), "character")
        segments = [Segment(self.leading)] if self.leading and leading else []
        cursor = 0
        for n, (a, b) in enumerate(spans):
            if text.startswith(SEPARATOR, b) and (n + 1 == len(spans) or spans[n + 1][0] >= b + len(SEPARATOR)):
                b += len(SEPARATOR)
            self._plain(segments, text[cursor:a])
            segments.append(Segment(tuple(self._encode(text[a:b])), document=n))
            cursor = b
        self._plain(segments, text[cursor:])
        return segments

    def from_ids(self, ids: list[int], spans: list[tuple[int, int]]) -> list[Segment]:
        """Segments of a token prompt with document spans [start, end) in tokens."""
        spans = _checked(spans, len(ids), "token")
        segments, cursor = [], 0
        for n, (a, b) in enumerate(spans):
            if a > cursor:
                segments.append(Segment(tuple(ids[cursor:a])))
            segments.append(Segment(tuple(ids[a:b]), document=n))
            cursor = b
        if cursor < len(ids):
            segments.append(Segment(tuple(ids[cursor:])))
        return segments

    def _plain(self, segments: list[Segment], text: str) -> None:
        if text:
            segments.append(Segment(tuple(self._encode(text))))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)


def _checked(spans, length: int, unit: str) -> list[tuple[int, int]]:
    out = []
    for s in spans:
        if not (isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(x, int) for x in s)):
            raise InvalidRequest(f"kv_hints.spans must be [start, end] pairs of {unit} offsets, got {s!r}")
        a, b = s
        if not 0 <= a < b <= length:
            raise InvalidRequest(f"kv_hints span [{a}, {b}) is empty or outside the prompt's {length} {unit}s")
        out.append((a, b))
    out.sort()
    for (_, b), (a, _) in zip(out, out[1:]):
        if a < b:
            raise InvalidRequest("kv_hints spans overlap")
    return out
