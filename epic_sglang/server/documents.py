"""The document store behind /v1/documents, /v1/rag and transparent PIC, on one worker thread
(SQLite connections belong to the thread that made them; FAISS index rebuilds are serialized).
Reads on behalf of a request name its namespace and see that namespace's documents only."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from epic_sglang.document_spans import DocumentIndex
from retrieval.parsers import Record

LIST_PAGE = 1000
MAX_ID = (1 << 63) - 1  # SQLite's largest INTEGER


class DocumentService:
    def __init__(self, store_path: Path, tokenizer):
        self.store_path = Path(store_path)
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="epic-documents")
        self._index: dict[str, DocumentIndex] = {}  # per namespace: transparent detection stays inside one
        self._store = None
        self._retriever = None
        self._pool.submit(self._open).result()

    def _open(self) -> None:
        from retrieval.store import DocumentStore

        self._store = DocumentStore(self.store_path)
        total = self._store.count()
        for offset in range(0, total, LIST_PAGE):
            for d in self._store.list(limit=LIST_PAGE, offset=offset):
                self._index.setdefault(d.namespace, DocumentIndex()).add(d.id, d.text)

    def _retriever_(self):
        if self._retriever is None:  # the embedder loads on first use
            from retrieval.retriever import Retriever

            self._retriever = Retriever(self._store)
        return self._retriever

    async def _run(self, fn: Callable[..., Any], *args) -> Any:
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    # ----------------------------------------------------------------- operations
    async def add(self, records: list[Record], namespace: str) -> list[int]:
        """Chunk, embed and store; returns every chunk's id (existing ones for duplicates)."""
        def add() -> list[int]:
            from retrieval.ingest import ingest_records

            ids = ingest_records(records, self._store, self.tokenizer, self._retriever_().embedder, namespace)
            for d in self._store.get(ids).values():
                self._index.setdefault(d.namespace, DocumentIndex()).add(d.id, d.text)
            return ids
        return await self._run(add)

    async def get(self, ids: list[int], namespace: str | None = None) -> dict:
        """{id: document} of the ids that exist in `namespace` (None: in any, for admins)."""
        def get() -> dict:
            found = self._store.get([i for i in ids if 0 < i <= MAX_ID])  # larger ones cannot exist
            return {i: d for i, d in found.items() if namespace is None or d.namespace == namespace}
        return await self._run(get)

    async def list(self, namespace: str | None, limit: int, offset: int):
        return await self._run(lambda: (self._store.list(namespace, limit, offset), self._store.count(namespace)))

    async def delete(self, ids: list[int]) -> int:
        def delete() -> int:
            for d in self._store.get([i for i in ids if 0 < i <= MAX_ID]).values():
                self._index[d.namespace].remove(d.id)
            return self._store.delete([i for i in ids if 0 < i <= MAX_ID])
        return await self._run(delete)

    async def search(self, question: str, top_k: int, namespace: str, min_score: float | None):
        return await self._run(lambda: self._retriever_().search(question, top_k, namespace, min_score))

    async def find_spans(self, text: str, namespace: str) -> list[tuple[int, int]]:
        """Where the namespace's documents occur in the text."""
        index = self._index.get(namespace)
        return await self._run(index.find, text) if index is not None else []

    def close(self) -> None:
        self._pool.shutdown(wait=True)
