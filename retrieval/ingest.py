"""Ingest files into a document store: parse, chunk by the serving model's tokens, dedupe,
embed in batches with a progress bar, commit batch by batch (resumable after a crash)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from tqdm import tqdm

from retrieval.chunker import chunk_text
from retrieval.embedder import Embedder
from retrieval.parsers import Record, expand, read_records
from retrieval.store import DocumentStore, content_hash

log = logging.getLogger("epic_sglang.ingest")


@dataclass
class IngestReport:
    files: int = 0
    skipped_files: int = 0
    chunks: int = 0
    added: int = 0
    duplicates: int = 0
    seconds: float = 0.0


def ingest(paths: list[str], store: DocumentStore, tokenizer, embedder: Embedder | None = None,
           namespace: str = "default", chunk_tokens: int = 512, batch_size: int = 64,
           progress: bool = True) -> IngestReport:
    """Files (folders, globs) into the store; unreadable files are skipped with a warning."""
    report, t0 = IngestReport(), time.perf_counter()
    files = expand(paths)

    bar = tqdm(total=len(files), unit="file", desc="ingest", disable=not progress, dynamic_ncols=True)

    def records() -> Iterator[Record]:
        for path in files:
            try:
                recs = list(read_records(path))
            except Exception as e:  # noqa: BLE001 - any parser's failure skips its file, never the run
                log.warning("skipped %s: %s: %s", path, type(e).__name__, e)
                report.skipped_files += 1
                bar.update(1)
                continue
            report.files += 1
            yield from recs
            bar.update(1)

    ingest_records(records(), store, tokenizer, embedder, namespace, chunk_tokens, batch_size, report=report, bar=bar)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def ingest_records(records: Iterable[Record], store: DocumentStore, tokenizer, embedder: Embedder | None = None,
                   namespace: str = "default", chunk_tokens: int = 512, batch_size: int = 64,
                   report: IngestReport | None = None, bar: tqdm | None = None) -> list[int]:
    """Chunk, dedupe, embed and store records; returns the ids of every chunk (new or already
    stored), in order. Streams: no corpus-sized buffers. `bar`: a progress bar (of files) whose
    postfix shows the chunks."""
    from epic_sglang.prompt import DOCUMENT_FORMAT

    def count(text: str) -> int:  # tokens of the document as the engine will cache it
        return len(tokenizer.encode(DOCUMENT_FORMAT.format(text=text), add_special_tokens=False))

    report = report if report is not None else IngestReport()
    embedder = embedder or Embedder()
    pending: list[tuple] = []
    hashes: list[str] = []  # every chunk's content hash, in order
    seen: set[str] = set()  # content hashes added in this run
    def flush() -> None:
        if not pending:
            return
        vectors = embedder.encode([row[5] for row in pending], batch_size=batch_size)
        added = store.add([(*row, vec) for row, vec in zip(pending, vectors)])
        report.added += added
        report.duplicates += len(pending) - added
        if bar is not None:
            bar.set_postfix(chunks=report.chunks, added=report.added)
        pending.clear()

    for rec in records:
        for ch in chunk_text(rec.text, count, chunk_tokens):
            report.chunks += 1
            digest = content_hash(ch.text)
            hashes.append(digest)
            if digest in seen or store.has(namespace, ch.text):
                report.duplicates += 1
                continue
            seen.add(digest)
            ids = tokenizer.encode(DOCUMENT_FORMAT.format(text=ch.text), add_special_tokens=False)
            pending.append((namespace, rec.source, rec.title, ch.start, ch.end, ch.text, ids))
            if len(pending) >= batch_size * 4:
                flush()
    flush()
    store.index()  # rebuild and persist the index for the new revision
    return store.ids_of(namespace, hashes)


def load_tokenizer(model: str):
    """The serving model's tokenizer (chunks are measured in its tokens)."""
    from transformers import AutoTokenizer

    from epic_sglang.models.loader import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(model), clean_up_tokenization_spaces=False)

