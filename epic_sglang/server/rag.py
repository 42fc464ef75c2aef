"""RAG over ingested documents (/v1/rag) and document management (/v1/documents).

/v1/rag: retrieve top_k documents of the namespace, link their (cached) KV behind the
system prompt, answer, and say which documents were used, their scores, and the timings.
"""
from __future__ import annotations

import time

from fastapi import APIRouter, Request as HTTPRequest
from fastapi.responses import JSONResponse

from epic_sglang.engine import Request
from epic_sglang.errors import InvalidRequest
from epic_sglang.server.inputs import NotFound, grant_of, json_body, owner_of, require_object, sampling_params
from epic_sglang.server.native import sse_response
from retrieval.parsers import Record
from retrieval.precompile import kv_namespace

router = APIRouter()
RAG_KEYS = {"question", "top_k", "namespace", "policy", "system", "sampling_params", "stream", "min_score"}
DEFAULT_SYSTEM = "Answer the question using the documents. Be brief."
MAX_TOP_K = 64


def _documents(app):
    if app.state.documents is None:
        raise InvalidRequest("this server has no document store (start it with --store)")
    return app.state.documents


def _number(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise InvalidRequest(f"{key} must be a number")
    return v


@router.post("/v1/rag")
async def rag(http: HTTPRequest):
    app, t0 = http.app, time.perf_counter()
    body = require_object(await json_body(http), RAG_KEYS, "the /v1/rag body")
    question = body.get("question")
    if not isinstance(question, str) or not question.strip():
        raise InvalidRequest("question must be a non-empty string")
    top_k = body.get("top_k", 5)
    most = min(MAX_TOP_K, app.state.config.max_documents)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= most:
        raise InvalidRequest(f"top_k must be an integer in [1, {most}]")
    system = body.get("system", DEFAULT_SYSTEM)
    if system is not None and not isinstance(system, str):
        raise InvalidRequest("system must be a string (or null for none)")
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("stream must be true or false")
    min_score = _number(body, "min_score")
    namespace = grant_of(http).namespace(body.get("namespace"))
    params, n = sampling_params(body.get("sampling_params"), app.state.config)
    if n != 1:
        raise InvalidRequest("n must be 1 for /v1/rag")
    policy = app.state.resolver.policy_of(body.get("policy"))
    hits = await _documents(app).search(question, top_k, namespace, min_score)
    retrieval_s = time.perf_counter() - t0
    cited = [{"id": h.document.id, "title": h.document.title, "source": h.document.source, "score": h.score,
              "similarity": h.similarity} for h in hits]
    if not hits:  # nothing to ground an answer on: say so instead of answering from nothing
        return {"answer": None, "documents": [], "finish_reason": None, "policy": None,
                "message": f"no document of namespace {namespace!r} matched the question"
                           + (f" with similarity >= {min_score:g}" if min_score is not None else ""),
                "timings": {"retrieval_s": retrieval_s, "e2e_s": time.perf_counter() - t0}}
    req = Request(question, [h.document.text for h in hits], system, policy, params, namespace=kv_namespace(namespace))

    def answer(result) -> dict:
        s = result.stats
        return {"answer": result.text, "documents": cited, "finish_reason": result.finish_reason, "policy": result.policy,
                "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": len(result.output_ids),
                          "reused_tokens": s.reused_tokens, "recomputed_tokens": s.recomputed_tokens,
                          "compiled_tokens": s.compiled_tokens, "cached_prefix_tokens": s.cached_prefix_tokens},
                "timings": {"retrieval_s": retrieval_s, "ttft_s": s.ttft_s + retrieval_s, "link_s": s.link_s,
                            "compile_s": s.compile_s, "e2e_s": time.perf_counter() - t0}}

    stream = app.state.runtime.stream(req, None, http, owner_of(http))
    if body.get("stream"):
        return await sse_response(stream, lambda p: [answer(p.result) if p.result is not None else {"text": p.text}],
                                  [{"documents": cited}])
    async for p in stream:
        if p.result is not None:
            return answer(p.result)
    return JSONResponse({"error": {"message": "client disconnected", "type": "client_closed", "code": 499}},
                        status_code=499)


DOC_KEYS = {"documents", "namespace", "precompile", "policy"}


@router.post("/v1/documents")
async def add_documents(http: HTTPRequest):
    """{documents: [text | {text, title?, source?}], namespace?, precompile?, policy?} -> stored chunk ids."""
    app, t0 = http.app, time.perf_counter()
    body = require_object(await json_body(http), DOC_KEYS, "the /v1/documents body")
    docs = body.get("documents")
    if not isinstance(docs, list) or not docs:
        raise InvalidRequest("documents must be a non-empty list of texts or {text, title, source} objects")
    records = []
    for i, d in enumerate(docs):
        d = {"text": d} if isinstance(d, str) else d
        if not isinstance(d, dict) or not set(d) <= {"text", "title", "source"}:
            raise InvalidRequest(f"documents[{i}] must be a text or an object with text, title, source")
        if not isinstance(d.get("text"), str) or not d["text"].strip():
            raise InvalidRequest(f"documents[{i}] has no text")
        records.append(Record(str(d.get("source", "api")), str(d.get("title", "")), d["text"]))
    namespace = grant_of(http).namespace(body.get("namespace"))
    if not isinstance(body.get("precompile", False), bool):
        raise InvalidRequest("precompile must be true or false")
    policy = app.state.resolver.policy_of(body.get("policy"))
    ids = await _documents(app).add(records, namespace)
    out = {"ids": ids, "namespace": namespace, "ingest_s": time.perf_counter() - t0}
    if body.get("precompile"):
        texts = [d.text for d in (await _documents(app).get(ids)).values()]
        out["compiled_tokens"] = await app.state.runtime.call(lambda e: e.compile(texts, policy, kv_namespace(namespace)))
    return out


def _doc_json(d, with_text: bool = True) -> dict:
    out = {"id": d.id, "namespace": d.namespace, "title": d.title, "source": d.source, "tokens": len(d.token_ids)}
    if with_text:
        out["text"] = d.text
    return out


@router.get("/v1/documents")
async def list_documents(http: HTTPRequest, namespace: str | None = None, limit: int = 100, offset: int = 0):
    if not 1 <= limit <= 1000 or offset < 0:
        raise InvalidRequest("limit must be in [1, 1000] and offset >= 0")
    docs, total = await _documents(http.app).list(namespace, limit, offset)
    return {"documents": [_doc_json(d, with_text=False) for d in docs], "total": total}


@router.get("/v1/documents/{doc_id}")
async def get_document(doc_id: int, http: HTTPRequest):
    found = await _documents(http.app).get([doc_id])
    if doc_id not in found:
        raise NotFound(f"unknown document id {doc_id}")
    return _doc_json(found[doc_id])


@router.delete("/v1/documents/{doc_id}")
async def delete_document(doc_id: int, http: HTTPRequest):
    if not await _documents(http.app).delete([doc_id]):
        raise NotFound(f"unknown document id {doc_id}")
    return {"deleted": 1}
