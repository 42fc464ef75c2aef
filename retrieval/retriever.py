"""Top-k retrieval over a document store: embed the question, search FAISS, filter."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.embedder import Embedder
from retrieval.store import DocumentStore, StoredDocument


@dataclass(frozen=True)
class Hit:
    score: float
    document: StoredDocument


class Retriever:
    def __init__(self, store: DocumentStore | str | Path, embedder: Embedder | None = None):
        self.store = store if isinstance(store, DocumentStore) else DocumentStore(store)
        self.embedder = embedder or Embedder()

    def search(self, question: str, top_k: int = 5, namespace: str | None = None,
               min_score: float | None = None) -> list[Hit]:
        import faiss

        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        index = self.store.index()
        if index.ntotal == 0:
            return []
        query = self.embedder.encode([question])
        params = None
        if namespace is not None:
            allowed = self.store.ids_in(namespace)
            if not len(allowed):
                return []
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        scores, ids = index.search(query, min(top_k, index.ntotal), params=params)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0
                 and (min_score is None or s >= min_score)]
        docs = self.store.get([i for _, i in pairs])
        return [Hit(s, docs[i]) for s, i in pairs if i in docs]


def recall_at_k(hits: list[list[str]], gold: list[set[str]]) -> float:
    """Fraction of gold items found in each hit list, averaged over questions."""
    return float(np.mean([len(g & set(h)) / len(g) for h, g in zip(hits, gold)]))
