"""`--radix-cache-backend epic`: builds a `PICRadixCache` inside a SGLang server.

Configured by environment, since SGLang's flag only names the backend:
EPIC_SGLANG_KV_DIR (disk tier folder; unset = no disk tier) and
EPIC_SGLANG_HOST_CACHE_GB (host tier size; default 0 = off).
"""
from __future__ import annotations

import hashlib
import os

from sglang.srt.mem_cache.registry import (TreeCacheBuildContext, register_radix_cache_backend,
                                           registered_radix_cache_backends)

from radix_ext.pic_radix_cache import PICRadixCache
from radix_ext.tiers import KVLayout

BACKEND_NAME = "epic"


def epic_radix_cache_factory(ctx: TreeCacheBuildContext) -> PICRadixCache:
    params = ctx.params
    kv_pool = params.token_to_kv_pool_allocator.get_kvcache()
    layout = KVLayout(len(kv_pool.k_buffer), kv_pool.head_num, kv_pool.head_dim, kv_pool.dtype)
    identity = f"{getattr(ctx.model_config, 'model_path', '')}|{layout}|tp{ctx.tp_size}.{ctx.tp_rank}"
    fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]
    kv_dir = os.environ.get("EPIC_SGLANG_KV_DIR") or None
    host_bytes = int(float(os.environ.get("EPIC_SGLANG_HOST_CACHE_GB", "0")) * (1 << 30))
    return PICRadixCache(params, kv_pool, layout, fingerprint, host_cache_bytes=host_bytes,
                         disk_dir=os.path.join(kv_dir, fingerprint) if kv_dir else None)


def register() -> None:
    """Idempotent: SGLang refuses a second registration under the same name."""
    if BACKEND_NAME not in registered_radix_cache_backends():
        register_radix_cache_backend(BACKEND_NAME, epic_radix_cache_factory)
