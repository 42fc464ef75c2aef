"""Resolve a model name or path to a folder of safetensors + config + tokenizer.

GGUF weights are dequantized once through transformers and cached as a Hugging Face folder
(`$EPIC_SGLANG_CACHE`, default ~/.cache/epic_sglang), so later starts read safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from epic_sglang.models.registry import MODELS, get_spec

CACHE_FORMAT = "1"  # bump when the converted layout changes


def cache_root() -> Path:
    return Path(os.environ.get("EPIC_SGLANG_CACHE", Path.home() / ".cache" / "epic_sglang"))


def resolve_model_dir(model: str) -> Path:
    """Return a folder with config.json, *.safetensors and tokenizer files for `model`."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: pass a Hugging Face model folder, a .gguf file or one of {', '.join(MODELS)}")
        return path
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        return _convert_cached(f"gguf-{path.stem}-{key}", [path])
    spec = get_spec(model)
    return _convert_cached(model, spec.gguf_parts())


def _convert_cached(name: str, parts: list[Path]) -> Path:
    target = cache_root() / "models" / f"{name}-v{CACHE_FORMAT}"
    if (target / "DONE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temp folder beside the target and rename, so an interrupted conversion never
    # leaves a half-written model behind.
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        gguf = parts[0]
        if len(parts) > 1:
            gguf = work / "joined.gguf"
            with open(gguf, "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, out, 16 << 20)
        _gguf_to_hf_folder(gguf, work / "model")
        (work / "model" / "DONE").write_text(json.dumps({"source": [str(p) for p in parts]}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(work / "model", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _gguf_to_hf_folder(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
