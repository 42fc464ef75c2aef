"""The load benchmark's reading of SGLang's profiler traces (`benchmarks/torch_trace.py`)."""
import gzip
import json

import torch

from benchmarks.torch_trace import complete_events, kernel_busy


def kernel(ts: float, dur: float, stream: int = 7) -> dict:
    return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "tid": stream}


def test_kernel_busy_counts_overlapping_kernels_once_and_gaps_not_at_all():
    events = [kernel(100, 10), kernel(105, 10, stream=8), kernel(130, 5), kernel(131, 2, stream=8),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000}]
    assert kernel_busy(events) == (15 + 5, 35, 4)  # [100, 115) and [130, 135) of [100, 135)
    assert kernel_busy(events[-1:]) == (0.0, 0.0, 0)


def test_complete_events_reads_a_real_profiler_trace_gzipped(tmp_path):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    plain = tmp_path / "t.trace.json"
    prof.export_chrome_trace(str(plain))
    packed = tmp_path / "t.trace.json.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    events = complete_events(packed)
    assert events == complete_events(plain)
    assert any(e["name"] == "aten::matmul" for e in events)
    every = json.loads(plain.read_text())["traceEvents"]
    assert events == [e for e in every if e.get("ph") == "X"] and len(events) < len(every)  # metadata events left out
    assert kernel_busy(events) == (0.0, 0.0, 0)  # no GPU here: no kernels
