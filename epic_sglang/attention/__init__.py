"""Attention backends: `torch_ref` (any device; the semantics oracle)."""
from epic_sglang.attention.torch_ref import TorchReferenceAttention

__all__ = ["TorchReferenceAttention"]
