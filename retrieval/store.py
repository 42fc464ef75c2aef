"""The document store: SQLite is the source of truth (texts, token ids, metadata, vectors);
the FAISS index is derived from it and rebuilt whenever it does not match.

Crash safety: every ingest batch is one SQLite transaction, and the index file is written
to a temporary name and renamed, tagged with the store's revision. A `kill -9` at any
point leaves either the old or the new state, and a stale index is rebuilt on open.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    source TEXT NOT NULL,
    title TEXT NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    text TEXT NOT NULL,
    token_ids BLOB NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (namespace, content_hash)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# Full-text (BM25) index kept in step with `documents` by triggers.
FTS_SCHEMA = """
CREATE VIRTUAL TABLE documents_fts USING fts5(title, text, content='documents', content_rowid='id');
CREATE TRIGGER documents_ai AFTER INSERT ON documents BEGIN
  INSERT INTO documents_fts(rowid, title, text) VALUES (new.id, new.title, new.text);
END;
CREATE TRIGGER documents_ad AFTER DELETE ON documents BEGIN
  INSERT INTO documents_fts(documents_fts, rowid, title, text) VALUES ('delete', old.id, old.title, old.text);
END;
INSERT INTO documents_fts(documents_fts) VALUES ('rebuild');
"""
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_ANN_THRESHOLD = 200_000  # below this many documents exact search is fast enough


@dataclass(frozen=True)
class StoredDocument:
    id: int
    namespace: str
    source: str
    title: str
    start: int
    end: int
    text: str
    token_ids: tuple[int, ...]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _statements(script: str) -> list[str]:
    """The complete SQL statements of a script (triggers hold `;` inside BEGIN ... END)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out


class DocumentStore:
    def __init__(self, path: str | Path, index_kind: str = "auto"):
        if index_kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {', '.join(INDEX_KINDS)}, got {index_kind!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path / "documents.sqlite3", timeout=60, isolation_level=None)
        # one schema check-and-create at a time: two processes opening a new store (an ingest
        # and a reader) must not both build the full-text index
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(SCHEMA):
                self.db.execute(statement)
            if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'documents_fts'").fetchone():
                for statement in _statements(FTS_SCHEMA):  # stores made before the full-text index get it here
                    self.db.execute(statement)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.isolation_level = ""  # back to sqlite3's default transactions for the rest
        self.index_kind = index_kind
        self._index = None

    # ------------------------------------------------------------ writes
    def add(self, rows: list[tuple[str, str, str, int, int, str, list[int], np.ndarray]]) -> int:
        """rows: (namespace, source, title, start, end, text, token_ids, vector). One
        transaction; duplicates (same namespace and text) are skipped. Returns rows added."""
        with self.db:
            before = self.count()  # (total_changes would count the full-text triggers too)
            self.db.executemany(
                "INSERT OR IGNORE INTO documents (namespace, content_hash, source, title, start, end, text, token_ids, vector)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(ns, content_hash(text), src, title, s, e, text, np.asarray(ids, dtype=np.int32).tobytes(),
                  np.asarray(vec, dtype=np.float32).tobytes()) for ns, src, title, s, e, text, ids, vec in rows])
            added = self.count() - before
            self._bump_revision()
        self._index = None
        return added

    def has(self, namespace: str, text: str) -> bool:
        return self.db.execute("SELECT 1 FROM documents WHERE namespace = ? AND content_hash = ?",
                               (namespace, content_hash(text))).fetchone() is not None

    def delete(self, ids: list[int]) -> int:
        with self.db:
            n = self.db.executemany("DELETE FROM documents WHERE id = ?", [(i,) for i in ids]).rowcount
            self._bump_revision()
        self._index = None
        return n

    def _bump_revision(self) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES ('revision', '1') "
                        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1")

    # ------------------------------------------------------------ reads
    def revision(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        return int(row[0]) if row else 0

    def count(self, namespace: str | None = None) -> int:
        if namespace is None:
            return self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM documents WHERE namespace = ?", (namespace,)).fetchone()[0]

    def get(self, ids: list[int]) -> dict[int, StoredDocument]:
        out = {}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            q = f"SELECT id, namespace, source, title, start, end, text, token_ids FROM documents WHERE id IN ({','.join('?' * len(part))})"
            for r in self.db.execute(q, part):
                out[r[0]] = StoredDocument(*r[:7], tuple(np.frombuffer(r[7], dtype=np.int32).tolist()))
        return out

    def ids_of(self, namespace: str, hashes: list[str]) -> list[int]:
        """The ids of documents by content hash, in the order given."""
        found = {}
        for chunk in range(0, len(hashes), 500):
            part = hashes[chunk:chunk + 500]
            q = f"SELECT content_hash, id FROM documents WHERE namespace = ? AND content_hash IN ({','.join('?' * len(part))})"
            found.update(self.db.execute(q, [namespace, *part]).fetchall())
        return [found[h] for h in hashes if h in found]

    def list(self, namespace: str | None = None, limit: int = 100, offset: int = 0) -> list[StoredDocument]:
        where, args = ("WHERE namespace = ?", [namespace]) if namespace is not None else ("", [])
        ids = [r[0] for r in self.db.execute(f"SELECT id FROM documents {where} ORDER BY id LIMIT ? OFFSET ?",
                                             [*args, limit, offset])]
        docs = self.get(ids)
        return [docs[i] for i in ids]

    def vectors(self, ids: list[int]) -> dict[int, np.ndarray]:
        q = f"SELECT id, vector FROM documents WHERE id IN ({','.join('?' * len(ids))})"
        return {r[0]: np.frombuffer(r[1], dtype=np.float32) for r in self.db.execute(q, ids)} if ids else {}

    def keyword_search(self, question: str, limit: int, namespace: str | None = None) -> list[int]:
        """Ids ranked by BM25 over titles and texts (any of the question's words)."""
        words = {w.lower() for w in re.findall(r"\w+", question) if len(w) > 1}
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in sorted(words))
        where, args = ("AND d.namespace = ?", [namespace]) if namespace is not None else ("", [])
        rows = self.db.execute(
            f"SELECT f.rowid FROM documents_fts f JOIN documents d ON d.id = f.rowid "
            f"WHERE documents_fts MATCH ? {where} ORDER BY bm25(documents_fts) LIMIT ?", [match, *args, limit])
        return [r[0] for r in rows]

    def ids_in(self, namespace: str) -> np.ndarray:
        return np.array([r[0] for r in self.db.execute("SELECT id FROM documents WHERE namespace = ?", (namespace,))],
                        dtype=np.int64)

    # ------------------------------------------------------------ index
    def index(self):
        """The FAISS index over every stored vector, loaded or rebuilt to match the store."""
        import faiss

        if self._index is not None:
            return self._index
        file, meta = self.path / "index.faiss", self.path / "index.json"
        rev = self.revision()
        if file.exists() and meta.exists():
            try:
                if json.loads(meta.read_text()).get("revision") == rev:
                    self._index = faiss.read_index(str(file))
                    return self._index
            except (ValueError, RuntimeError):
                pass  # unreadable: rebuild below
        self._index = self._build()
        tmp = file.with_suffix(".faiss.tmp")
        faiss.write_index(self._index, str(tmp))
        os.replace(tmp, file)
        meta_tmp = meta.with_suffix(".json.tmp")
        meta_tmp.write_text(json.dumps({"revision": rev, "kind": self.index_kind, "count": self._index.ntotal}))
        os.replace(meta_tmp, meta)
        return self._index

    def _build(self):
        import faiss

        rows = self.db.execute("SELECT id, vector FROM documents ORDER BY id").fetchall()
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 384), np.float32)
        dim = vecs.shape[1]
        kind = self.index_kind
        if kind == "auto":
            kind = "hnsw" if len(ids) >= AUTO_ANN_THRESHOLD else "flat"
        if kind == "ivf" and len(ids) >= 1000:
            nlist = max(16, int(4 * np.sqrt(len(ids))))
            base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            base.train(vecs)
            base.nprobe = max(8, nlist // 16)
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efSearch = 128
        else:
            base = faiss.IndexFlatIP(dim)
        index = faiss.IndexIDMap2(base)
        if len(ids):
            index.add_with_ids(vecs, ids)
        return index
