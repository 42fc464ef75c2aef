"""Moving a compiled document to where a request places it.

SGLang stores keys already rotated by their position. A document compiled alone has its
token t rotated by t; linked at offset s it must read as rotated by s + t. Rotations
compose (R(s + t) = R(s) R(t), any RoPE whose angle is linear in the position: plain,
Llama-3 and linear scaling), so a copy rotated by s into request-private slots is the
document's KV at its new place; values are position-free and copied as they are. The
shared document slots are only read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding, apply_rotary_emb

from epic_sglang.rotate_copy import rotate_copy


@dataclass(frozen=True)
class RopeTable:
    cos_sin_cache: torch.Tensor  # (max_position, rotary_dim): [cos | sin], as SGLang builds it
    rotary_dim: int
    is_neox_style: bool

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "RopeTable":
        """The model's rotary embedding (every layer shares one table)."""
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                if getattr(module, "mscale", 1.0) != 1.0:  # YaRN scales cos/sin: not composable
                    raise NotImplementedError(f"{type(module).__name__} with mscale != 1 cannot be re-rotated")
                return cls(module.cos_sin_cache, module.rotary_dim, module.is_neox_style)
        raise NotImplementedError(f"{type(model).__name__} has no SGLang RotaryEmbedding")

    def angles(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of rotating by `delta` (tokens,) positions, fp32."""
        return self.cos_sin_cache.index_select(0, delta).float().chunk(2, dim=-1)

    def rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """keys (tokens, heads, head_dim) rotated by the angles of `angles` (in fp32)."""
        rot = apply_rotary_emb(keys[..., :self.rotary_dim].float(), cos, sin, self.is_neox_style).to(keys.dtype)
        return rot if self.rotary_dim == keys.shape[-1] else torch.cat([rot, keys[..., self.rotary_dim:]], dim=-1)


def copy_rotated(kv_pool, rope: RopeTable, src: torch.Tensor, dst: torch.Tensor, delta: torch.Tensor) -> None:
    """For every layer of an SGLang MHA pool: K[dst] = rotate(K[src], delta), V[dst] = V[src].
    On GPU one Triton launch for all layers; on CPU (tests) torch, layer by layer."""
    cos, sin = rope.angles(delta)
    if src.is_cuda:
        rotate_copy(kv_pool.k_buffer, kv_pool.v_buffer, kv_pool.k_buffer, kv_pool.v_buffer,
                    src, dst, torch.cat([cos, sin], dim=-1), rope.is_neox_style)
        return
    for k_buffer, v_buffer in zip(kv_pool.k_buffer, kv_pool.v_buffer):
        k_buffer[dst] = rope.rotate(k_buffer[src], cos, sin)
        v_buffer[dst] = v_buffer[src]
