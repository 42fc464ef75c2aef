"""A full garbage collection in a serving process, with the startup objects tracked and frozen.

    python benchmarks/gc_pause.py [--model smollm2-135m]

Builds the app as `epic-sglang serve` does (engine, tokenizer, routes) and times a full
collection (`gc.collect()`, median of 5) before and after `freeze_startup_objects()`, which
`serve` calls: a full collection runs on the thread that is serving, so its time is a stall
of every request in flight. Writes the result to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine, write_section  # noqa: E402
from epic_sglang.server import ServerConfig, create_app, freeze_startup_objects  # noqa: E402


def full_collection_ms(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    app = create_app(ServerConfig(model=args.model))  # noqa: F841 (held: its objects stay alive)
    gc.collect()
    tracked, before = len(gc.get_objects()), full_collection_ms()
    freeze_startup_objects()
    frozen, after = gc.get_freeze_count(), full_collection_ms()
    body = f"""## GC pause of a serving process ({args.model})

Card: {machine()}. The app as `epic-sglang serve` builds it; a full collection (`gc.collect()`,
median of 5), which stalls every request in flight on the serving thread:

| startup objects | objects the collector tracks | full collection ms |
|---|---|---|
| tracked (before `freeze_startup_objects`) | {tracked:,} | {before:,.2f} |
| frozen (what `serve` does) | {len(gc.get_objects()):,} ({frozen:,} frozen) | {after:,.2f} |
"""
    write_section(f"gc_pause-{args.model}", body)
    print(body)


if __name__ == "__main__":
    main()
