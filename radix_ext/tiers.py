"""Lower tiers for compiled documents: host memory and disk.

A document evicted from the device pool is demoted to the host tier (an LRU bounded in
bytes); every compiled document is also written through to the disk tier when one is
configured (one safetensors file per document plus an SQLite index), so it survives a
restart. A file is used only after it is verified: format, model fingerprint, DocKey
recomputed from its own token ids, shapes, dtype and a sha256 of the KV bytes. Anything
else is refused with one log line, deleted, and the document is compiled again.

Neither tier works on the serving thread beyond taking a copy of the KV (one gather on the
device): a GPU copy to host runs on a side stream into pinned memory and is waited for only
when the document comes back; the checksum, the file and its index entry are written by
one writer thread, which finishes its queue before the process exits.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from radix_ext.doc_key import document_key

logger = logging.getLogger(__name__)

DISK_FORMAT = "epic-sglang-doc-kv/1"


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's KV in the pool: what a stored document must match."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def token_bytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    def shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        return (self.num_layers, num_tokens, self.num_kv_heads, self.head_dim)


def gather_kv(pool, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, tokens, heads, dim) copies of K and V at `slots` (SGLang pool interface)."""
    k = torch.stack([pool.k_buffer[i][slots] for i in range(len(pool.k_buffer))])
    v = torch.stack([pool.v_buffer[i][slots] for i in range(len(pool.v_buffer))])
    return k, v


def scatter_kv(pool, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    device = pool.k_buffer[0].device
    k, v = k.to(device, non_blocking=True), v.to(device, non_blocking=True)
    for i in range(len(pool.k_buffer)):
        pool.k_buffer[i][slots] = k[i]
        pool.v_buffer[i][slots] = v[i]


_copy_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
    """A host copy of `t` (a fresh tensor nothing else writes) and the event that marks it
    complete: on CUDA, into pinned memory on a side stream after what the current stream has
    queued so far; on the CPU, `t` itself."""
    if not t.is_cuda:
        return t, None
    stream = _copy_streams.setdefault(t.device, torch.cuda.Stream(t.device))
    stream.wait_stream(torch.cuda.current_stream(t.device))
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
    t.record_stream(stream)  # its memory is not reused before the copy is done
    return host, stream.record_event()


@dataclass
class HostEntry:
    token_ids: tuple[int, ...]
    k: torch.Tensor
    v: torch.Tensor
    copied: "torch.cuda.Event | None" = None  # the copy to host, if it may still be running

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def wait(self) -> "HostEntry":
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        return self


class HostTier:
    """Documents demoted from the device, least recently used dropped first."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.entries: OrderedDict[str, HostEntry] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0

    def put(self, key: str, token_ids: tuple[int, ...], k: torch.Tensor, v: torch.Tensor) -> None:
        """`k`, `v`: fresh copies (`gather_kv`); on CUDA they reach the host in the background."""
        (k, copied), (v, _) = to_host(k), to_host(v)  # v's copy is queued after k's, on the same stream
        entry = HostEntry(token_ids, k, v, copied)
        if entry.nbytes > self.capacity_bytes:
            return
        while self.nbytes + entry.nbytes > self.capacity_bytes:
            _, dropped = self.entries.popitem(last=False)
            self.nbytes -= dropped.nbytes
            self.evictions += 1
        self.entries[key] = entry
        self.nbytes += entry.nbytes

    def pop(self, key: str) -> HostEntry | None:
        """The entry, its copy complete."""
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes
        return entry.wait() if entry is not None else None

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0


def _kv_digest(k: torch.Tensor, v: torch.Tensor) -> str:
    h = hashlib.sha256(k.contiguous().view(torch.uint8).numpy())
    h.update(v.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


class RefusedFile(ValueError):
    pass


class DiskTier:
    """One safetensors file per document under `root/docs/`, indexed in `root/index.sqlite3`."""

    def __init__(self, root: str | Path, fingerprint: str, layout: KVLayout):
        self.root = Path(root)
        (self.root / "docs").mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.layout = layout
        self.refused = 0
        self.write_failures = 0
        self.db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False)
        self._db_lock = threading.Lock()  # the writer thread and the serving thread share the index
        self.db.execute("CREATE TABLE IF NOT EXISTS documents (key TEXT PRIMARY KEY, namespace TEXT, "
                        "recipe TEXT, tokens INTEGER, bytes INTEGER, fingerprint TEXT, created REAL)")
        self.db.commit()
        # joined at interpreter exit by concurrent.futures, so queued writes are not lost
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="epic-kv-writer")
        self._pending: dict[str, Future] = {}

    def path(self, key: str) -> Path:
        return self.root / "docs" / key[:2] / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        """On disk, or queued to be written."""
        return key in self._pending or self.path(key).exists()

    def put(self, key: str, namespace: str | None, recipe: str, token_ids: tuple[int, ...],
            k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue the document's file; `k`, `v`: fresh copies (`gather_kv`)."""
        if key in self._pending:
            return
        (k, copied), (v, _) = to_host(k), to_host(v)
        future = self._writer.submit(self._write, key, namespace, recipe, token_ids, HostEntry(token_ids, k, v, copied))
        self._pending[key] = future
        future.add_done_callback(lambda _: self._pending.pop(key, None))

    def _write(self, key: str, namespace: str | None, recipe: str, token_ids: tuple[int, ...], entry: HostEntry) -> None:
        try:
            k, v = entry.wait().k.contiguous(), entry.v.contiguous()
            meta = {"format": DISK_FORMAT, "key": key, "fingerprint": self.fingerprint, "recipe": recipe,
                    "namespace": namespace or "", "dtype": str(self.layout.dtype), "kv_sha256": _kv_digest(k, v)}
            path = self.path(key)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"k": k, "v": v, "token_ids": torch.tensor(token_ids, dtype=torch.int64)}, str(tmp), metadata=meta)
            os.replace(tmp, path)  # readers see the whole file or none
            with self._db_lock, self.db:
                self.db.execute("INSERT OR REPLACE INTO documents VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (key, namespace or "", recipe, len(token_ids), path.stat().st_size,
                                 self.fingerprint, time.time()))
        except Exception as e:  # noqa: BLE001 - a full disk must not take the serving thread down
            self.write_failures += 1
            logger.warning("could not write cached KV of %s: %s; it stays on the device tiers only", key[:12], e)

    def drain(self) -> None:
        """Wait for every queued write."""
        for future in list(self._pending.values()):
            future.result()

    def get(self, key: str) -> HostEntry | None:
        """The verified document, or None (missing, or refused and deleted)."""
        queued = self._pending.get(key)
        if queued is not None:  # written a moment ago: wait for the file
            queued.result()
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return self._read_verified(key, path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is refused the same way
            logger.warning("refusing cached KV file %s: %s; the document will be recompiled", path, e)
            self.refused += 1
            self.remove(key)
            return None

    def _read_verified(self, key: str, path: Path) -> HostEntry:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in ("k", "v", "token_ids")}
        if meta.get("format") != DISK_FORMAT:
            raise RefusedFile(f"unknown format {meta.get('format')!r}")
        if meta.get("fingerprint") != self.fingerprint:
            raise RefusedFile(f"compiled by another model (fingerprint {meta.get('fingerprint')!r})")
        ids = tuple(tensors["token_ids"].tolist())
        if meta.get("key") != key or document_key(self.fingerprint, meta.get("recipe", ""),
                                                  meta.get("namespace") or None, ids) != key:
            raise RefusedFile("content hash does not match its token ids")
        k, v = tensors["k"], tensors["v"]
        expected = self.layout.shape(len(ids))
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise RefusedFile(f"KV shape {tuple(k.shape)} != expected {expected}")
        if k.dtype != self.layout.dtype or v.dtype != self.layout.dtype:
            raise RefusedFile(f"KV dtype {k.dtype} != pool dtype {self.layout.dtype}")
        if _kv_digest(k, v) != meta.get("kv_sha256"):
            raise RefusedFile("KV bytes do not match their checksum")
        return HostEntry(ids, k, v)

    def remove(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
        with self._db_lock, self.db:
            self.db.execute("DELETE FROM documents WHERE key = ?", (key,))

    def count(self) -> int:
        with self._db_lock:
            return int(self.db.execute("SELECT COUNT(*) FROM documents").fetchone()[0])

    def nbytes(self) -> int:
        with self._db_lock:
            return int(self.db.execute("SELECT COALESCE(SUM(bytes), 0) FROM documents").fetchone()[0])
