"""Prometheus metrics of the server, in a registry of its own.

Gauges and counters of the engine are read from its latest statistics when
scraped, summed and per replica (a ``replica`` label: its state, load, KV
blocks, failures and rebuilds); the latency histograms and the counters of
requests that end early (cancelled, past their deadline, refused by reason,
failed with their replica) are observed as they happen. Every series carries
a ``model_name`` label, the served model's name (vLLM's ``model_name``).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from specserve.engine.replica import ReplicaState
from specserve.engine.outputs import RequestMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0,
                      2.5)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0)
_REQUEST_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                         60.0, 120.0, 300.0, 600.0, 1200.0)
_TOKEN_COUNT_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))  # 1 to 500k
REJECTION_REASONS = ("invalid_argument", "queue_full", "unavailable", "slow_reader")
REPLICA_STATES = tuple(state.value for state in ReplicaState)


class _EngineStatsCollector(Collector):
    def __init__(self, get_stats: Callable[[], Any]) -> None:
        self._get_stats = get_stats

    def collect(self):
        s = self._get_stats()
        for name, doc, value in (
            ("specserve_num_requests_running", "Requests being computed (all replicas).",
             s.num_running),
            ("specserve_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("specserve_kv_blocks_used", "KV cache blocks in use.", s.kv_blocks_used),
            ("specserve_kv_blocks_total", "KV cache blocks in all.", s.kv_blocks_total),
            ("specserve_num_speculative_tokens",
             "k of each replica's last step (mean over replicas; adaptive speculation moves it).",
             s.num_speculative_tokens),
            ("specserve_kv_cache_usage_perc",
             "Fraction of the KV cache blocks in use, 0 to 1 (1 is full).",
             s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("specserve_prompt_tokens_total",
                                  "Prompt tokens of requests that have output their first "
                                  "token (cached ones included).", value=s.prompt_tokens_total)
        yield CounterMetricFamily("specserve_generation_tokens_total", "Output tokens.",
                                  value=s.generation_tokens_total)
        yield CounterMetricFamily("specserve_draft_tokens_proposed_total",
                                  "Tokens the draft model proposed.",
                                  value=s.draft_tokens_proposed_total)
        yield CounterMetricFamily("specserve_draft_tokens_accepted_total",
                                  "Proposed tokens the target model accepted.",
                                  value=s.draft_tokens_accepted_total)
        yield CounterMetricFamily("specserve_num_preemptions_total",
                                  "Running requests sent back to wait and be recomputed "
                                  "(KV blocks ran out).",
                                  value=s.num_preemptions_total)
        yield CounterMetricFamily("specserve_prefix_cache_queries_total",
                                  "Prompt tokens of admitted requests looked up in the prefix "
                                  "cache.", value=s.prefix_cache_queries_total)
        yield CounterMetricFamily("specserve_prefix_cache_hits_total",
                                  "Of them, tokens whose KV blocks were found cached (not "
                                  "computed again).", value=s.prefix_cache_hits_total)
        per_position = CounterMetricFamily(
            "specserve_spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens (those output) at each speculative position, 1 to k: "
            "position i counts steps whose first i proposals were all accepted.",
            labels=["position"])
        for i, count in enumerate(getattr(s, "spec_decode_num_accepted_tokens_per_pos", []), 1):
            per_position.add_metric([str(i)], count)
        yield per_position
        yield from _replica_metrics(s.replicas)


def _replica_metrics(replicas: list[Any]):
    """Each replica's state and load (its gauges are 0 while it does not serve)."""
    state = GaugeMetricFamily("specserve_replica_state",
                              "1 for the state each replica is in (starting, serving, failed, "
                              "rebuilding), 0 for the others.", labels=["replica", "state"])
    families = [(GaugeMetricFamily, "specserve_replica_requests_running",
                 "Requests being computed on the replica.", "num_running"),
                (GaugeMetricFamily, "specserve_replica_requests_waiting",
                 "Requests waiting on the replica.", "num_waiting"),
                (GaugeMetricFamily, "specserve_replica_kv_blocks_used",
                 "KV cache blocks in use on the replica.", "kv_blocks_used"),
                (GaugeMetricFamily, "specserve_replica_kv_blocks_total",
                 "KV cache blocks of the replica (0 while it does not serve).", "kv_blocks_total"),
                (CounterMetricFamily, "specserve_replica_failures_total",
                 "Times the replica failed (a step raised: a worker died, a device error).",
                 "failures_total"),
                (CounterMetricFamily, "specserve_replica_restarts_total",
                 "Times the replica was rebuilt and served again.", "restarts_total")]
    built = [(kind(name, doc, labels=["replica"]), field) for kind, name, doc, field in families]
    for r in replicas:
        label = str(r.index)
        for name in REPLICA_STATES:
            state.add_metric([label, name], 1.0 if r.state == name else 0.0)
        for family, field in built:
            family.add_metric([label], getattr(r, field))
    yield state
    for family, _field in built:
        yield family


class _WithModelName(Collector):
    """The series of another registry, each with a ``model_name`` label."""

    def __init__(self, inner: CollectorRegistry, model_name: str) -> None:
        self._inner = inner
        self._model_name = model_name

    def collect(self):
        for metric in self._inner.collect():
            labelled = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            labelled.samples = [sample._replace(labels={"model_name": self._model_name,
                                                        **sample.labels})
                                for sample in metric.samples]
            yield labelled


class ServerMetrics:
    """``get_stats`` returns an object with the fields of
    `engine.async_engine.EngineStatsSnapshot`; it is called on every scrape.
    ``registry`` is what /metrics exposes: every series of ``own``, labelled
    with ``model_name``."""

    def __init__(self, get_stats: Callable[[], Any], model_name: str) -> None:
        self.own = CollectorRegistry(auto_describe=True)
        self.own.register(_EngineStatsCollector(get_stats))
        self.registry = CollectorRegistry()
        self.registry.register(_WithModelName(self.own, model_name))
        self.time_to_first_token = Histogram(
            "specserve_time_to_first_token_seconds",
            "From a request's arrival at the server to its first output token.",
            buckets=_LATENCY_BUCKETS, registry=self.own)
        self.time_per_output_token = Histogram(
            "specserve_time_per_output_token_seconds",
            "Mean time between a request's output tokens after the first.",
            buckets=_PER_TOKEN_BUCKETS, registry=self.own)
        self.step_time = Histogram(
            "specserve_step_time_seconds", "Duration of one engine step.",
            buckets=_STEP_BUCKETS, registry=self.own)
        self.requests_finished = Counter(
            "specserve_requests_finished", "Requests that ended, by finish reason.",
            ["finish_reason"], registry=self.own)
        self.requests_cancelled = Counter(
            "specserve_requests_cancelled",
            "Streams whose client cancelled (or went away) before their last message.",
            registry=self.own)
        self.requests_deadline_exceeded = Counter(
            "specserve_requests_deadline_exceeded",
            "Streams whose client's deadline passed before their last message.",
            registry=self.own)
        self.requests_rejected = Counter(
            "specserve_requests_rejected",
            "Requests refused with a status, by reason (invalid_argument, queue_full, "
            "unavailable; slow_reader: aborted when the client fell more than "
            "--max-stream-buffer-tokens behind).", ["reason"], registry=self.own)
        for reason in REJECTION_REASONS:
            self.requests_rejected.labels(reason=reason)
        self.requests_failed = Counter(
            "specserve_requests_failed",
            "Requests ended with INTERNAL because the replica serving them failed.",
            registry=self.own)
        self._add_request_histograms()
        self._http = None

    def _add_request_histograms(self) -> None:
        """A finished request's phases and lengths (vLLM's set)."""
        def seconds(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=_REQUEST_TIME_BUCKETS, registry=self.own)

        def tokens(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=_TOKEN_COUNT_BUCKETS, registry=self.own)

        self.e2e_request_latency = seconds(
            "specserve_e2e_request_latency_seconds",
            "From a request's arrival at the server to its last output.")
        self.request_queue_time = seconds(
            "specserve_request_queue_time_seconds",
            "From a request's arrival at the engine to the start of its first step.")
        self.request_prefill_time = seconds(
            "specserve_request_prefill_time_seconds",
            "From the start of a request's first step to its first output token.")
        self.request_decode_time = seconds(
            "specserve_request_decode_time_seconds",
            "From a request's first output token to its last.")
        self.request_prompt_tokens = tokens("specserve_request_prompt_tokens",
                                            "Prompt tokens of each finished request.")
        self.request_generation_tokens = tokens("specserve_request_generation_tokens",
                                                "Output tokens of each finished request.")

    def observe_request(self, arrival: float, first_token: float | None, finished: float,
                        num_tokens: int, finish_reason: str,
                        timing: RequestMetrics | None = None) -> None:
        """A finished request: ``arrival``, ``first_token`` and ``finished`` as
        the front end saw them (time.monotonic()), ``num_tokens`` it streamed;
        ``timing``, the engine's record of it (its queue, prefill and decode)."""
        if first_token is not None:
            self.time_to_first_token.observe(first_token - arrival)
            if num_tokens > 1:
                self.time_per_output_token.observe((finished - first_token) / (num_tokens - 1))
        self.requests_finished.labels(finish_reason=finish_reason).inc()
        self.e2e_request_latency.observe(finished - arrival)
        self.request_generation_tokens.observe(num_tokens)
        if timing is not None:
            self._observe_phases(timing)

    def _observe_phases(self, m: RequestMetrics) -> None:
        if m.prompt_tokens:
            self.request_prompt_tokens.observe(m.prompt_tokens)
        if m.first_scheduled_time is None:  # never computed (aborted while waiting)
            return
        self.request_queue_time.observe(m.first_scheduled_time - m.arrival_time)
        if m.first_token_time is not None:
            self.request_prefill_time.observe(m.first_token_time - m.first_scheduled_time)
            if m.finished_time is not None:
                self.request_decode_time.observe(m.finished_time - m.first_token_time)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the port (useful when ``port`` is 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
