"""FAISS retrieval over ingested documents.

Not built yet (issue: retrieval and the ingest CLI).
"""
