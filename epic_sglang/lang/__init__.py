"""Mark documents in SGLang frontend programs so an epic-sglang server links their cached KV.

    import sglang as sgl
    from epic_sglang.lang import EpicEndpoint, document

    sgl.set_default_backend(EpicEndpoint("http://127.0.0.1:30000", policy="legolink-16"))

    @sgl.function
    def rag(s, docs, question):
        s += sgl.user("".join(document(d) for d in docs) + "Question: " + question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

`document(text)` returns the text with the store's separator and remembers it; every
/generate call the program makes through an `EpicEndpoint` then carries `kv_hints.spans`
for the remembered documents found in its prompt (exact character spans), so the server
compiles each document once and reuses its KV wherever it appears, behind any prefix.
Documents shorter than 48 characters are not marked (too short to be worth caching).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from epic_sglang.document_spans import SEPARATOR, DocumentIndex

MAX_REMEMBERED = 4096


class _Registry:
    """The documents marked in this process, most recent last (bounded, thread-safe)."""

    def __init__(self, limit: int = MAX_REMEMBERED):
        self.limit = limit
        self.ids: OrderedDict[str, int] = OrderedDict()
        self.index = DocumentIndex()
        self.lock = threading.Lock()
        self.next_id = 0

    def add(self, text: str) -> None:
        with self.lock:
            if text in self.ids:
                self.ids.move_to_end(text)
                return
            self.ids[text] = self.next_id
            self.index.add(self.next_id, text)
            self.next_id += 1
            if len(self.ids) > self.limit:
                _, old = self.ids.popitem(last=False)
                self.index.remove(old)

    def spans(self, prompt: str) -> list[tuple[int, int]]:
        with self.lock:
            return self.index.find(prompt)


REGISTRY = _Registry()


def document(text: str) -> str:
    """The document's text as it goes into a prompt (followed by the separator), remembered
    so EpicEndpoint can tell the server where it is."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a document needs some text")
    REGISTRY.add(text)
    return text + SEPARATOR


def _endpoint_class():
    from sglang.lang.backend import runtime_endpoint

    class EpicEndpoint(runtime_endpoint.RuntimeEndpoint):
        """SGLang's RuntimeEndpoint that adds kv_hints (document spans, policy, namespace)."""

        def __init__(self, base_url: str, api_key: str | None = None, policy: str | None = None,
                     namespace: str | None = None, **kwargs):
            super().__init__(base_url, api_key=api_key, **kwargs)
            self.policy, self.namespace = policy, namespace
            _install(runtime_endpoint)
            _ENDPOINTS[base_url.rstrip("/") + "/generate"] = self

        def hints(self, prompt: str) -> dict:
            out = {"spans": [list(s) for s in REGISTRY.spans(prompt)]}
            if self.policy:
                out["policy"] = self.policy
            if self.namespace:
                out["namespace"] = self.namespace
            return out

    return EpicEndpoint


_ENDPOINTS: dict[str, object] = {}
_INSTALLED = threading.Lock()


def _install(module) -> None:
    """Wrap the frontend's `http_request` (once) so /generate calls to an EpicEndpoint carry
    kv_hints for the documents found in their text."""
    with _INSTALLED:
        if getattr(module.http_request, "_epic", False):
            return
        plain = module.http_request

        def http_request(url, json=None, **kwargs):
            endpoint = _ENDPOINTS.get(url)
            if endpoint is not None and isinstance(json, dict) and "text" in json and "kv_hints" not in json:
                text = json["text"]
                json = {**json, "kv_hints": [endpoint.hints(t) for t in text] if isinstance(text, list)
                        else endpoint.hints(text)}
            return plain(url, json=json, **kwargs)

        http_request._epic = True
        module.http_request = http_request


def __getattr__(name: str):
    if name == "EpicEndpoint":  # imports SGLang's frontend only when asked for
        cls = _endpoint_class()
        globals()["EpicEndpoint"] = cls
        return cls
    raise AttributeError(name)


__all__ = ["EpicEndpoint", "document"]
