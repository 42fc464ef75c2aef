"""Reading a compiled document's keys where a request places it, without moving them.

SGLang stores keys already rotated by their position: a document compiled alone holds its
token t rotated by t (after legolink0's sinks, t + sink). Linked at prompt position s + t it
must score as rotated by s + t. Rotations compose (R(a + b) = R(a) R(b), any RoPE whose
angle is linear in the position: plain, Llama-3 and linear scaling), so for a query already
rotated by its position p

    R(p) q . R(t + d) k = (R(-d) R(p) q) . R(t) k,    d = s - sink,

i.e. the query, rotated back by the document's shift d, scores the stored key in place. The
plugin attends each reused run with such rotated copies of the queries after it; the shared
document slots are only read. (CacheBlend's check layer compares the document's keys with
freshly computed ones, and its later layers read them from the request's row: there they are
rotated forward by d, `rotated_copy`.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding, apply_rotary_emb

from epic_sglang.rotate_copy import rotate_copy, rotate_rows


@dataclass(frozen=True)
class RopeTable:
    cos_sin_cache: torch.Tensor  # (max_position, rotary_dim) fp32: [cos | sin], as SGLang builds it
    rotary_dim: int
    is_neox_style: bool

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> "RopeTable":
        """The model's rotary embedding (every layer shares one table), in fp32: SGLang casts
        its own table to the model's dtype at the first forward."""
        for module in model.modules():
            if isinstance(module, RotaryEmbedding):
                if getattr(module, "mscale", 1.0) != 1.0:  # YaRN scales cos/sin: not composable
                    raise NotImplementedError(f"{type(module).__name__} with mscale != 1 cannot be re-rotated")
                table = module._compute_cos_sin_cache().float().to(module.cos_sin_cache.device)
                return cls(table, module.rotary_dim, module.is_neox_style)
        raise NotImplementedError(f"{type(model).__name__} has no SGLang RotaryEmbedding")

    def angles(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of rotating by `delta` (tokens,) positions, negative ones too, fp32."""
        cos, sin = self.cos_sin_cache.index_select(0, delta.abs()).float().chunk(2, dim=-1)
        return cos, sin * torch.where(delta < 0, -1.0, 1.0).to(sin.device)[:, None]

    def rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """keys (tokens, heads, head_dim) rotated by the angles of `angles` (in fp32)."""
        rot = apply_rotary_emb(keys[..., :self.rotary_dim].float(), cos, sin, self.is_neox_style).to(keys.dtype)
        return rot if self.rotary_dim == keys.shape[-1] else torch.cat([rot, keys[..., self.rotary_dim:]], dim=-1)


def rotated_rows(rope: RopeTable, x: torch.Tensor, rows: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x[rows] (x: (tokens, heads, head_dim)), row i rotated by the angles cos_sin[i]
    ([cos | sin], fp32). On GPU one Triton launch; on CPU (tests) torch."""
    if x.is_cuda:
        return rotate_rows(x.contiguous(), rows, cos_sin, rope.is_neox_style)
    return rope.rotate(x[rows], *cos_sin.chunk(2, dim=-1))


def rotated_copy(rope: RopeTable, k_buffers: list[torch.Tensor], v_buffers: list[torch.Tensor], src: torch.Tensor,
                 dst: torch.Tensor, cos_sin: torch.Tensor, k_out: list[torch.Tensor] | None = None,
                 v_out: list[torch.Tensor] | None = None) -> None:
    """In every layer's buffers: k_out[dst[i]] = k[src[i]] rotated by cos_sin[i] ([cos | sin],
    fp32), v_out[dst[i]] = v[src[i]] (`k_out`, `v_out`: the same buffers unless given). On GPU
    one Triton launch for all layers; on CPU torch."""
    k_out, v_out = k_out or k_buffers, v_out or v_buffers
    if not src.numel():
        return
    if k_buffers[0].is_cuda:
        rotate_copy(k_buffers, v_buffers, k_out, v_out, src, dst, cos_sin, rope.is_neox_style)
        return
    for k, v, k_dst, v_dst in zip(k_buffers, v_buffers, k_out, v_out):
        k_dst[dst] = rope.rotate(k[src], *cos_sin.chunk(2, dim=-1))
        v_dst[dst] = v[src]

