"""Everything `epic-sglang serve` can be told, in one place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerConfig:
    model: str = "qwen2.5-0.5b"
    served_model_name: str | None = None  # the name clients see; the model's by default
    device: str | None = None
    policy: str = "legolink-16"  # link policy of requests that do not name one
    store: Path | None = None  # document store (retrieval, /v1/documents, transparent PIC)
    kv_dir: Path | None = None  # disk tier for compiled documents
    kv_cache_gb: float = 2.0
    host_cache_gb: float = 0.0
    transparent_documents: bool = True  # find ingested documents inside plain prompts
    api_key: str | None = None  # a shared user key for every route (but /health and /metrics): every namespace
    admin_api_key: str | None = None  # everything, admin routes (documents, flush) included
    api_keys: Path | None = None  # JSON list of per-tenant keys and their namespaces (server/access.py)
    max_running: int = 32
    prefill_token_budget: int = 8192
    max_queued: int = 1024
    max_body_bytes: int = 8 << 20
    max_batch: int = 128  # prompts in one /generate or /v1/completions call
    max_n: int = 16
    max_documents: int = 64  # documents in one request
    default_max_new_tokens: int = 128
    max_response_bytes: int = 64 << 20  # a bound on one response body (logprobs of many tokens and samples)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
