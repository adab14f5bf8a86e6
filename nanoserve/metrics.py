"""Prometheus metrics with vLLM's names, so dashboards and benchmarks written for vLLM work unchanged.

Gauges and counters are read from the engine's stats snapshot (`AsyncLLMEngine.stats`) at scrape time; histograms
and the per-reason success counter are fed by the server with each finished request (`RequestStream`: arrival,
first scheduled, every token). `render()` writes the Prometheus text format for GET /metrics through
`prometheus_client`: prefix `vllm:`, label `model_name`, counters with `_total`.
"""
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from .async_engine import RequestStream
from .engine import RequestOutput

TIME_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]

GAUGES = {"num_requests_running": "Number of requests in model execution batches.",
          "num_requests_waiting": "Number of requests waiting to be processed.",
          "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage."}
COUNTERS = {"prompt_tokens": "Number of prefill tokens processed.",
            "generation_tokens": "Number of generation tokens processed.",
            "num_preemptions": "Cumulative number of preemptions from the engine.",
            "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
            "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
            "spec_decode_num_drafts": "Number of spec decoding drafts.",
            "spec_decode_num_draft_tokens": "Number of draft tokens.",
            "spec_decode_num_accepted_tokens": "Number of accepted tokens."}
TIME_HISTOGRAMS = {"time_to_first_token_seconds": "Histogram of time to first token in seconds.",
                   "inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
                   "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
                   "request_queue_time_seconds": "Histogram of time spent in WAITING phase for request."}
TOKEN_HISTOGRAMS = {"request_prompt_tokens": "Number of prefill tokens processed.",
                    "request_generation_tokens": "Number of generation tokens processed."}


class _StatsCollector:
    """Exposes the engine's own gauges and counters: the engine keeps the totals, so they are read at scrape time
    rather than mirrored into prometheus_client objects."""

    def __init__(self, model_name: str):
        self.model_name, self.stats = model_name, {}

    def collect(self):
        # Only what the snapshot holds: spec-decode counters appear once the engine has a drafter.
        for name in (n for n in GAUGES if n in self.stats):
            yield self._family(GaugeMetricFamily, name, GAUGES[name])
        for name in (n for n in COUNTERS if n in self.stats):
            yield self._family(CounterMetricFamily, name, COUNTERS[name])
        lora = self.stats.get("lora_requests_info")
        if lora is not None:  # vLLM's: the adapters in the labels, the scrape's time as the value
            family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                       labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            family.add_metric([str(lora["max_lora"]), lora["running"], lora["waiting"]], time.time())
            yield family

    def _family(self, kind, name: str, help_text: str):
        family = kind(f"vllm:{name}", help_text, labels=["model_name"])
        family.add_metric([self.model_name], float(self.stats[name]))
        return family


class Metrics:
    """vLLM's metrics for one server: its own registry, so two servers in one process never share a series."""
    # What generate_latest writes; prometheus_client serves it under this type when no newer one is negotiated.
    content_type = CONTENT_TYPE_PLAIN_0_0_4

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.engine_stats = _StatsCollector(model_name)
        self.registry.register(self.engine_stats)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          ["finished_reason", "model_name"], registry=self.registry)
        self.success = lambda reason: success.labels(reason, model_name)
        for reason in ("stop", "length", "abort"):  # present at 0 from the start, so rate() sees the first one
            self.success(reason)
        self.histograms = {
            name: Histogram(f"vllm:{name}", help_text, ["model_name"], registry=self.registry,
                            buckets=buckets).labels(model_name)
            for table, buckets in ((TIME_HISTOGRAMS, TIME_BUCKETS), (TOKEN_HISTOGRAMS, TOKEN_BUCKETS))
            for name, help_text in table.items()}

    def observe(self, stream: RequestStream, out: RequestOutput) -> None:
        h, times = self.histograms, stream.token_times
        h["time_to_first_token_seconds"].observe(times[0] - stream.arrival_time)
        for before, after in zip(times, times[1:]):
            h["inter_token_latency_seconds"].observe(after - before)
        h["e2e_request_latency_seconds"].observe(times[-1] - stream.arrival_time)
        h["request_queue_time_seconds"].observe((stream.scheduled_time or times[0]) - stream.arrival_time)
        h["request_prompt_tokens"].observe(len(out.prompt_token_ids))
        h["request_generation_tokens"].observe(sum(len(o.token_ids) for o in out.outputs))
        for o in out.outputs:  # "stop", "length", or "error" when the engine failed the request
            self.success(o.finish_reason).inc()

    def count_abort(self) -> None:
        self.success("abort").inc()

    def render(self, stats: dict) -> str:
        self.engine_stats.stats = stats  # the collector reads this snapshot during generate_latest
        return generate_latest(self.registry).decode()
