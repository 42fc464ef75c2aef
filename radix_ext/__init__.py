"""SGLang's radix cache extended with position-independent document nodes, tiers and
persistence (`PICRadixCache`), registered as SGLang's `epic` radix-cache backend."""
import radix_ext._sglang  # noqa: F401  (first: imports SGLang without its CPU warnings)
from radix_ext.doc_key import document_key
from radix_ext.pic_radix_cache import CacheCounters, PICRadixCache
from radix_ext.sglang_backend import BACKEND_NAME, epic_radix_cache_factory, register
from radix_ext.tiers import DiskTier, HostTier, KVLayout

__all__ = ["BACKEND_NAME", "CacheCounters", "DiskTier", "HostTier", "KVLayout", "PICRadixCache",
           "document_key", "epic_radix_cache_factory", "register"]
