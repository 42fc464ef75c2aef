"""EPIC inside a real SGLang server, without forking it.

Installed as the `sglang.srt.plugins` entry point `epic` (pyproject.toml): SGLang calls
`load()` in every process before the engine starts. It registers the `epic` radix-cache
backend (radix_ext's `PICRadixCache`) and the link pass's hooks (`hooks.py`). Serve with

    python -m sglang.launch_server --model-path M --attention-backend flashinfer \\
        --radix-cache-backend epic --disable-prefill-cuda-graph

(without the last flag when EPIC_SGLANG_PREFILL_GRAPHS=1: `prefill_graphs.py`)

and send link requests as `input_ids` plus a hint in `extra_key` (`wire.py`, built by
`client.py`); requests without a hint are plain SGLang requests with exact prefix caching.
"""
from __future__ import annotations


def load() -> None:
    import radix_ext
    from epic_sglang.sglang_plugin import hooks

    radix_ext.register()
    hooks.install()
