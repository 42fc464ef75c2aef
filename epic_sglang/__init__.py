"""epic-sglang: Position-Independent Caching (EPIC / LegoLink) for RAG serving.

The public names load on first use, so commands that need no model (`epic-sglang models`,
`--help`) start without importing torch."""
from __future__ import annotations

import importlib

__all__ = ["Engine", "GenerateResult", "GenerateStats", "Request", "SamplingParams", "parse_policy"]
__version__ = "0.1.0"
_HOME = {"Engine": "engine", "GenerateResult": "engine", "GenerateStats": "engine", "Request": "engine",
         "SamplingParams": "sampling", "parse_policy": "policies"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"epic_sglang.{_HOME[name]}"), name)
    raise AttributeError(f"module 'epic_sglang' has no attribute {name!r}")
