"""FAISS retrieval over ingested documents: parse -> chunk by the serving model's tokens ->
embed (all-MiniLM-L6-v2, offline) -> SQLite store (source of truth) + FAISS index."""
import logging

# faiss tries its AVX512 / AVX2 builds first and logs each miss with a ModuleNotFoundError at
# INFO: harmless (it falls back), alarming in a server's log
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
from retrieval.retriever import Hit, Retriever  # noqa: E402
from retrieval.store import DocumentStore  # noqa: E402

__all__ = ["DocumentStore", "Hit", "Retriever"]
