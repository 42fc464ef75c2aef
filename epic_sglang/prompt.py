"""Chat-templated RAG prompts as token segments with exact document boundaries.

The prompt is the model's chat template with documents and question in the user turn:

    [head: template up to the user content] [doc_1] ... [doc_N] [question + template tail]

Each document is tokenized alone (`DOCUMENT_FORMAT`), never re-tokenized in context, so its
tokens are the same wherever it appears and its cached KV lines up exactly.
"""
from __future__ import annotations

from functools import lru_cache

from epic_sglang.errors import InvalidRequest
from epic_sglang.policies import Segment

DOCUMENT_FORMAT = "{text}\n\n"
QUESTION_FORMAT = "Question: {question}"
_CONTENT = "\x00EPIC_USER_CONTENT\x00"


class PromptBuilder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._encode_document = lru_cache(maxsize=65536)(self._encode_document_uncached)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_document_uncached(self, text: str) -> tuple[int, ...]:
        if not text.strip():
            raise InvalidRequest("empty document: every document needs some text")
        return tuple(self.encode(DOCUMENT_FORMAT.format(text=text)))

    def encode_document(self, text: str) -> tuple[int, ...]:
        if not isinstance(text, str):
            raise InvalidRequest(f"a document must be a string, got {type(text).__name__}")
        return self._encode_document(text)

    def template_parts(self, system: str | None, history: list[dict] | None = None) -> tuple[str, str]:
        """(head, tail) of the chat template around the content of the last user turn."""
        messages = ([{"role": "system", "content": system}] if system is not None else []) + list(history or [])
        messages.append({"role": "user", "content": _CONTENT})
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            head, tail = text.split(_CONTENT)
            return head, tail
        turns = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1] if m["role"] != "system")
        return (f"{system}\n\n" if system else "") + turns, "\n"

    def build(self, question: str, documents: list[str], system: str | None = None,
              history: list[dict] | None = None) -> list[Segment]:
        """[template head (system, earlier turns)] [doc_1..doc_N] [question + template tail]."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidRequest("empty question: pass the text to answer")
        head, tail = self.template_parts(system, history)
        segments = [Segment(tuple(self.encode(head)))] if head else []
        segments += [Segment(self.encode_document(d), document=i) for i, d in enumerate(documents)]
        question_text = QUESTION_FORMAT.format(question=question) if documents else question
        segments.append(Segment(tuple(self.encode(question_text + tail))))
        return segments

    def render(self, messages: list[dict]) -> str:
        """The whole chat as the model sees it, ready for the assistant's turn."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        head, tail = self.template_parts(system, [m for m in messages[:-1] if m["role"] != "system"])
        return head + messages[-1]["content"] + tail

    def sink_tokens(self, count: int) -> list[int]:
        """Throw-away tokens for `legolink0`: the template's first token (an attention sink by
        training: `<|im_start|>`, `<|begin_of_text|>`, ...), repeated; none for count 0."""
        if count == 0:  # plain recipes: no template to encode
            return []
        head, _ = self.template_parts(None)
        first = self.encode(head)[:1] or [self.tokenizer.bos_token_id or 0]
        return first * count
