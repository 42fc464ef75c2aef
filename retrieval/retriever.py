"""Top-k retrieval over a document store: embed the question, search FAISS, filter."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.embedder import Embedder
from retrieval.store import DocumentStore, StoredDocument


MODES = ("hybrid", "dense")
RRF_K = 60  # reciprocal-rank fusion constant (Cormack et al.)
CANDIDATES = 50  # per ranker, before fusion


@dataclass(frozen=True)
class Hit:
    score: float  # what ranked it: the fused reciprocal-rank score (hybrid) or the cosine (dense)
    document: StoredDocument
    similarity: float = 0.0  # cosine similarity of question and document embeddings


class Retriever:
    """`hybrid` (default): FAISS dense ranking fused with SQLite FTS5 BM25 by reciprocal
    rank; the keywords catch the entity names multi-hop questions hinge on. `dense`: FAISS
    only. Hits are ordered by the score that ranked them (`Hit.score`) and carry the dense
    cosine beside it (`Hit.similarity`, what `min_score` bounds)."""

    def __init__(self, store: DocumentStore | str | Path, embedder: Embedder | None = None, mode: str = "hybrid"):
        if mode not in MODES:
            raise ValueError(f"retrieval mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.store = store if isinstance(store, DocumentStore) else DocumentStore(store)
        self.embedder = embedder or Embedder()
        self.mode = mode

    def search(self, question: str, top_k: int = 5, namespace: str | None = None,
               min_score: float | None = None) -> list[Hit]:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        query = self.embedder.encode([question])[0]
        dense = self._dense(query, max(top_k, CANDIDATES) if self.mode == "hybrid" else top_k, namespace)
        fused: dict[int, float] = {}
        if self.mode == "hybrid":
            for ranking in (dense, self.store.keyword_search(question, max(top_k, CANDIDATES), namespace)):
                for rank, i in enumerate(ranking):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
        ranked = sorted(fused, key=lambda i: -fused[i]) if fused else dense
        vectors = self.store.vectors(ranked)
        cosine = {i: float(vectors[i] @ query) for i in ranked if i in vectors}
        kept = [i for i in ranked if i in cosine and (min_score is None or cosine[i] >= min_score)][:top_k]
        docs = self.store.get(kept)
        return [Hit(fused.get(i, cosine[i]), docs[i], cosine[i]) for i in kept if i in docs]

    def _dense(self, query: np.ndarray, k: int, namespace: str | None) -> list[int]:
        import faiss

        index = self.store.index()
        if index.ntotal == 0:
            return []
        params = None
        if namespace is not None:
            allowed = self.store.ids_in(namespace)
            if not len(allowed):
                return []
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        _, ids = index.search(query[None, :], min(k, index.ntotal), params=params)
        return [int(i) for i in ids[0] if i >= 0]


def recall_at_k(hits: list[list[str]], gold: list[set[str]]) -> float:
    """Fraction of gold items found in each hit list, averaged over questions."""
    return float(np.mean([len(g & set(h)) / len(g) for h, g in zip(hits, gold)]))
