"""`ingest --compile`: put every stored document's KV in radix_ext's disk tier.

Resumable: a document whose verified file is already on disk is skipped, and each batch
is written before the next starts, so an interrupted run loses at most one batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from epic_sglang.engine import Engine
from epic_sglang.policies import Segment
from retrieval.store import DocumentStore

BATCH_TOKENS = 8192


def kv_namespace(store_namespace: str) -> str | None:
    """The store's default namespace is the engine's shared (None) namespace, so plain
    requests reuse ingested documents; any other namespace is a tenant of its own."""
    return None if store_namespace == "default" else store_namespace


@dataclass
class PrecompileReport:
    compiled: int = 0  # documents compiled now
    already: int = 0  # documents already on disk
    tokens: int = 0
    seconds: float = 0.0


def precompile(store: DocumentStore, engine: Engine, namespace: str, policy: str = "legolink-16",
               progress: bool = True) -> PrecompileReport:
    if engine.cache.disk is None:
        raise ValueError("precompiling needs an engine with a disk tier (kv_dir)")
    from tqdm import tqdm

    t0 = time.perf_counter()
    report = PrecompileReport()
    ns = kv_namespace(namespace)
    total = store.count(namespace)
    bar = tqdm(total=total, unit="doc", desc="compile", disable=not progress, dynamic_ncols=True)
    batch: list[Segment] = []

    def flush() -> None:
        report.tokens += engine.compile_segments(batch, policy, ns)
        report.compiled += len(batch)
        bar.update(len(batch))
        batch.clear()

    for offset in range(0, total, 500):
        for doc in store.list(namespace, limit=500, offset=offset):
            if engine.cache.disk.contains(engine.document_key(doc.token_ids, policy, ns)):
                report.already += 1
                bar.update(1)
                continue
            batch.append(Segment(doc.token_ids, document=doc.id))
            if sum(len(s) for s in batch) >= BATCH_TOKENS:
                flush()
    if batch:
        flush()
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report
