"""FAISS retrieval over ingested documents: parse -> chunk by the serving model's tokens ->
embed (all-MiniLM-L6-v2, offline) -> SQLite store (source of truth) + FAISS index."""
from retrieval.retriever import Hit, Retriever
from retrieval.store import DocumentStore

__all__ = ["DocumentStore", "Hit", "Retriever"]
