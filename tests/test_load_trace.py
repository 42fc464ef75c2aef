"""The RAG load's request trace and the table read from it (`benchmarks/load_trace.py`)."""
from benchmarks.load_trace import TRACE_HEADER, percentile, steady_rate, trace_rows, write_trace


def request(run: str, sent: float, done: float, ttft: float = 0.1, compiled: float = 0.0) -> dict:
    return {"run": run, "sent": sent, "compiled": compiled, "ttft": ttft, "done": done,
            "prompt_tokens": 100, "cached_tokens": 50}


def test_steady_rate_counts_completions_in_the_second_half_of_the_arrivals():
    # arrivals every 0.1 s for 4 s (10 a second); a server that keeps up answers each in 0.5 s
    keeping_up = [request("a", i / 10, 0.5) for i in range(41)]
    assert steady_rate(keeping_up) == 20 / 2  # completions at 2.1 ... 4.0 s (those sent at 1.6 ... 3.5 s): the offered rate
    # one that answers nothing until the arrivals stop completes none while they last
    starved = [request("b", i / 10, 4.5 - i / 10) for i in range(41)]
    assert steady_rate(starved) == 0.0
    assert steady_rate([request("c", 0.0, 1.0)]) == 0.0  # a single arrival has no window


def test_trace_rows_read_each_run_of_a_written_trace(tmp_path):
    path = tmp_path / "load_trace.jsonl"
    fast = [request("legolink-16 16", i / 10, 0.1 + 31 * 0.01, ttft=0.1) for i in range(41)]
    waited = [request("legolink-16 32", 0.0, 0.5, ttft=0.3, compiled=0.2), request("legolink-16 32", 1.0, 1.0)]
    write_trace(path, [fast, waited])
    rows = trace_rows(path)
    assert len(rows) == 2 and rows[0].startswith("| legolink-16 16 | 41 | 100 / 100 | 41 |")
    assert rows[0].endswith("| 10 / 10 | 10.0 |")  # 10 ms per output token; 20 completions in the last 2 s
    assert "| 1 | 200 | 100 |" in rows[1]  # one waited 200 ms for a compile, then 100 ms to its first token
    assert all(r.count("|") == TRACE_HEADER.splitlines()[0].count("|") for r in rows)
    assert percentile([3, 1, 2, 4], 0.9) == 3  # the sorted value at int(0.9 x 3)
