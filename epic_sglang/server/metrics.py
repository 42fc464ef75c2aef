"""Prometheus metrics: latency histograms and token counters from finished requests; queue,
KV and cache gauges read at scrape time (on the scheduler thread, which owns the engine)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from epic_sglang.engine import GenerateResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("epic_time_to_first_token_seconds", "Time to first token", ["policy"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("epic_time_per_output_token_seconds", "Decode time per output token",
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("epic_e2e_request_latency_seconds", "Request latency, admission to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("epic_requests", "Finished requests", ["finish_reason"], registry=r)
        self.http_errors = Counter("epic_http_errors", "Requests refused or failed", ["status"], registry=r)
        self.tokens = Counter("epic_tokens", "Tokens by kind", ["kind"], registry=r)

    def observe(self, result: GenerateResult) -> None:
        s = result.stats
        self.ttft.labels(result.policy).observe(s.ttft_s)
        if len(result.output_ids) > 1:
            self.tpot.observe(s.decode_s / (len(result.output_ids) - 1))
        self.e2e.observe(s.ttft_s + s.decode_s)
        self.requests.labels((result.finish_reason or {}).get("type", "none")).inc()
        for kind, n in (("prompt", s.prompt_tokens), ("generated", len(result.output_ids)),
                        ("reused", s.reused_tokens), ("recomputed", s.recomputed_tokens),
                        ("compiled", s.compiled_tokens), ("cached_prefix", s.cached_prefix_tokens)):
            self.tokens.labels(kind).inc(n)

    def add_gauges(self, read) -> None:
        """`read()` -> dict of scheduler, pool and cache numbers (called at scrape time)."""
        self.registry.register(_Gauges(read))


class _Gauges:
    def __init__(self, read):
        self.read = read

    def collect(self):
        values = self.read()
        for name, doc in (("queue_depth", "Requests waiting for admission"), ("running", "Requests being decoded"),
                          ("kv_used_tokens", "KV pool slots in use (requests and cache)"),
                          ("kv_total_tokens", "KV pool size in slots")):
            g = GaugeMetricFamily(f"epic_{name}", doc)
            g.add_metric([], values[name])
            yield g
        cache = GaugeMetricFamily("epic_cache", "radix_ext counters (hits per tier, misses, evictions, bytes)",
                                  labels=["counter"])
        for key, value in sorted(values["cache"].items()):
            if isinstance(value, (int, float)):
                cache.add_metric([key], value)
        yield cache
