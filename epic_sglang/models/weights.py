"""Build a `CausalLM` from a Hugging Face folder of safetensors."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from epic_sglang.models.config import ModelConfig
from epic_sglang.models.decoder import CausalLM


def load_causal_lm(model_dir: Path, dtype: torch.dtype, device: torch.device, dummy: bool = False) -> CausalLM:
    """`dummy`: random weights at the checkpoint's shape (speed runs; SGLang's --load-format dummy)."""
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = CausalLM(cfg)
    if dummy:
        return _random_init(model.to(dtype).to_empty(device=device)).eval()
    state: dict[str, torch.Tensor] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for f in files:
        state.update(load_file(f))
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint in {model_dir} does not fit {cfg.model_type}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def _random_init(model: CausalLM) -> CausalLM:
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model
