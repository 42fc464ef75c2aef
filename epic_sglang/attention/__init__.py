"""Attention backends: `torch` (any device; the semantics oracle) and `flashinfer` (GPU)."""
from __future__ import annotations

import importlib.util

import torch

from epic_sglang.attention.torch_ref import TorchReferenceAttention
from epic_sglang.link_plan import CascadeTuning
from epic_sglang.models.config import ModelConfig

BACKENDS = ("auto", "torch", "flashinfer")


def make_attention(name: str, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                   link_mode: str = "auto", tuning: CascadeTuning = CascadeTuning()):
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "auto":
        fits = (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
                and importlib.util.find_spec("flashinfer") is not None)
        name = "flashinfer" if fits else "torch"
    if name == "torch":
        return TorchReferenceAttention(cfg, device)
    from epic_sglang.attention.flashinfer_backend import FlashInferAttention

    return FlashInferAttention(cfg, device, dtype, link_mode, tuning)


__all__ = ["BACKENDS", "TorchReferenceAttention", "make_attention"]
