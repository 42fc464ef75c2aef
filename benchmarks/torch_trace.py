"""Reading the Chrome traces torch's profiler writes (SGLang's `/start_profile` too)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path


def complete_events(trace: Path) -> list[dict]:
    """The trace's complete events ("ph": "X": kernels, host ops, runtime calls), gzipped or not."""
    raw = gzip.open(trace).read() if trace.suffix == ".gz" else trace.read_bytes()
    return [e for e in json.loads(raw)["traceEvents"] if e.get("ph") == "X"]


def kernel_busy(events: list[dict]) -> tuple[float, float, int]:
    """(µs some kernel ran, µs from the first kernel's start to the last one's end, kernels): the
    union of the kernels' intervals over every stream, so overlapping kernels count once."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel")
    if not spans:
        return 0.0, 0.0, 0
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, max(e for _, e in spans) - spans[0][0], len(spans)
