"""Prometheus metrics with vLLM's names, so dashboards and benchmarks written for vLLM work unchanged.

Gauges and counters are read from the engine's stats snapshot (`AsyncLLMEngine.stats`); histograms are fed by the
server with each finished request's timings (`RequestStream`: arrival, first scheduled, every token). `render()`
writes the Prometheus text format for GET /metrics: prefix `vllm:`, label `model_name`, counters with `_total`.
"""
from .async_engine import RequestStream
from .engine import RequestOutput

TIME_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


class Histogram:
    def __init__(self, buckets: list[float]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.sum, self.count = self.sum + value, self.count + 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1  # cumulative, as Prometheus buckets are


class Metrics:
    """vLLM's metric names (prefix `vllm:`, label model_name); gauges and counters come from the engine's stats,
    histograms from the request streams' timings."""
    GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"]
    COUNTERS = ["prompt_tokens", "generation_tokens", "num_preemptions", "prefix_cache_queries", "prefix_cache_hits",
                "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens"]

    def __init__(self, model_name: str):
        escaped = model_name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        self.label = f'model_name="{escaped}"'
        self.success: dict[str, int] = {}
        self.histograms = {name: Histogram(TIME_BUCKETS) for name in (
            "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
            "request_queue_time_seconds")}
        self.histograms.update({name: Histogram(TOKEN_BUCKETS) for name in (
            "request_prompt_tokens", "request_generation_tokens")})

    def observe(self, stream: RequestStream, out: RequestOutput) -> None:
        h, times = self.histograms, stream.token_times
        h["time_to_first_token_seconds"].observe(times[0] - stream.arrival_time)
        for before, after in zip(times, times[1:]):
            h["inter_token_latency_seconds"].observe(after - before)
        h["e2e_request_latency_seconds"].observe(times[-1] - stream.arrival_time)
        h["request_queue_time_seconds"].observe((stream.scheduled_time or times[0]) - stream.arrival_time)
        h["request_prompt_tokens"].observe(len(out.prompt_token_ids))
        h["request_generation_tokens"].observe(sum(len(o.token_ids) for o in out.outputs))
        for o in out.outputs:
            self.success[o.finish_reason] = self.success.get(o.finish_reason, 0) + 1

    def count_abort(self) -> None:
        self.success["abort"] = self.success.get("abort", 0) + 1

    def render(self, stats: dict) -> str:
        lines = []
        for name in self.GAUGES:
            lines += [f"# TYPE vllm:{name} gauge", f"vllm:{name}{{{self.label}}} {float(stats[name])}"]
        for name in (n for n in self.COUNTERS if n in stats):  # spec-decode counters appear once the engine has them
            lines += [f"# TYPE vllm:{name} counter", f"vllm:{name}_total{{{self.label}}} {float(stats[name])}"]
        lines.append("# TYPE vllm:request_success counter")
        for reason in sorted({"stop", "length", "abort"} | set(self.success)):
            lines.append(f'vllm:request_success_total{{finished_reason="{reason}",{self.label}}} '
                         f"{float(self.success.get(reason, 0))}")
        for name, h in self.histograms.items():
            lines.append(f"# TYPE vllm:{name} histogram")
            for bound, count in zip(h.buckets + ["+Inf"], h.counts + [h.count]):
                le = bound if bound == "+Inf" else float(bound)
                lines.append(f'vllm:{name}_bucket{{le="{le}",{self.label}}} {float(count)}')
            lines += [f"vllm:{name}_sum{{{self.label}}} {h.sum}", f"vllm:{name}_count{{{self.label}}} {float(h.count)}"]
        return "\n".join(lines) + "\n"
