"""The document store behind /v1/documents, /v1/rag and transparent PIC, on one worker thread
(SQLite connections belong to the thread that made them; FAISS index rebuilds are serialized)."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from epic_sglang.document_spans import DocumentIndex
from retrieval.parsers import Record

LIST_PAGE = 1000


class DocumentService:
    def __init__(self, store_path: Path, tokenizer):
        self.store_path = Path(store_path)
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="epic-documents")
        self.index = DocumentIndex()
        self._store = None
        self._retriever = None
        self._pool.submit(self._open).result()

    def _open(self) -> None:
        from retrieval.store import DocumentStore

        self._store = DocumentStore(self.store_path)
        total = self._store.count()
        for offset in range(0, total, LIST_PAGE):
            for d in self._store.list(limit=LIST_PAGE, offset=offset):
                self.index.add(d.id, d.text)

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
                self.index.add(d.id, d.text)
            return ids
        return await self._run(add)

    async def get(self, ids: list[int]):
        return await self._run(lambda: self._store.get(ids))

    async def list(self, namespace: str | None, limit: int, offset: int):
        return await self._run(lambda: (self._store.list(namespace, limit, offset), self._store.count(namespace)))

    async def delete(self, ids: list[int]) -> int:
        def delete() -> int:
            for i in ids:
                self.index.remove(i)
            return self._store.delete(ids)
        return await self._run(delete)

    async def search(self, question: str, top_k: int, namespace: str | None, min_score: float | None):
        return await self._run(lambda: self._retriever_().search(question, top_k, namespace, min_score))

    async def find_spans(self, text: str) -> list[tuple[int, int]]:
        return await self._run(self.index.find, text)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
