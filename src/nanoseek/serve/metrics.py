"""Prometheus metrics for `GET /metrics`, written by hand in the text exposition format.

The format is a few lines of text, so a dependency (prometheus_client) would add more than it saves.
Names follow vLLM's so existing dashboards are easy to port (`vllm:time_to_first_token_seconds` ->
`nanoseek_time_to_first_token_seconds`, ...). Counters and histograms are updated by request handlers
on the event loop; gauges come from the engine's `stats()` snapshot, which the engine thread refreshes.
"""

from __future__ import annotations

import bisect
from collections import Counter

# Latency buckets in seconds: CPU toy models sit at the low end, real models at the high end.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: str) -> list[str]:
        lines, cumulative = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
        lines.append(f"{name}_sum{{{labels}}} {self.sum}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    """Server-side counters and latency histograms, plus rendering of the engine's gauges."""

    def __init__(self, model_name: str):
        self.labels = f'model_name="{_escape(model_name)}"'
        self.requests = Counter()          # (endpoint, its finish reasons joined by "," or "aborted") -> count
        self.rejected = Counter()          # error code -> count (400s, 401s, 404s, overload)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cached_prompt_tokens = 0
        self.ttft = Histogram()
        self.e2e = Histogram()

    def record_finished(self, endpoint: str, outcome: str, prompt_tokens: int, completion_tokens: int,
                        cached_tokens: int, e2e_seconds: float) -> None:
        self.requests[(endpoint, outcome)] += 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += completion_tokens
        self.cached_prompt_tokens += cached_tokens
        self.e2e.observe(e2e_seconds)

    def render(self, engine_stats: dict, num_in_flight: int) -> str:
        """The whole exposition text. `engine_stats` is `LLM.stats()` (may be empty if unavailable)."""
        lab = self.labels
        out: list[str] = []

        def metric(name, kind, help_text, samples):
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        metric("nanoseek_requests_total", "counter", "Finished requests by endpoint and outcome (finish reasons, or aborted).",
               [f'nanoseek_requests_total{{{lab},endpoint="{ep}",outcome="{oc}"}} {n}'
                for (ep, oc), n in sorted(self.requests.items())] or [f"nanoseek_requests_total{{{lab}}} 0"])
        metric("nanoseek_requests_rejected_total", "counter", "Requests refused before generation, by error code.",
               [f'nanoseek_requests_rejected_total{{{lab},code="{code}"}} {n}' for code, n in sorted(self.rejected.items())]
               or [f"nanoseek_requests_rejected_total{{{lab}}} 0"])
        metric("nanoseek_requests_in_flight", "gauge", "Sequences (n per request) admitted by the server and not finished.",
               [f"nanoseek_requests_in_flight{{{lab}}} {num_in_flight}"])
        metric("nanoseek_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
               [f"nanoseek_prompt_tokens_total{{{lab}}} {self.prompt_tokens}"])
        metric("nanoseek_generation_tokens_total", "counter", "Generated tokens of finished requests.",
               [f"nanoseek_generation_tokens_total{{{lab}}} {self.generation_tokens}"])
        metric("nanoseek_prompt_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               [f"nanoseek_prompt_cache_hit_tokens_total{{{lab}}} {self.cached_prompt_tokens}"])
        hit_rate = self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        metric("nanoseek_prefix_cache_hit_rate", "gauge", "Fraction of prompt tokens served from the prefix cache.",
               [f"nanoseek_prefix_cache_hit_rate{{{lab}}} {hit_rate:.6f}"])
        gauges = [
            ("num_running", "nanoseek_num_requests_running", "Sequences the engine is generating for."),
            ("num_waiting", "nanoseek_num_requests_waiting", "Sequences queued in the engine (the waiting queue)."),
            ("cache_usage", "nanoseek_kv_cache_usage_perc", "Fraction of latent-cache blocks in use (0..1)."),
            ("num_preemptions", "nanoseek_num_preemptions_total", "Sequences preempted for lack of cache blocks."),
            # vLLM's spec_decode counters: acceptance = accepted / draft
            ("spec_draft_tokens", "nanoseek_spec_decode_num_draft_tokens_total", "MTP draft tokens verified."),
            ("spec_accepted_tokens", "nanoseek_spec_decode_num_accepted_tokens_total", "MTP draft tokens accepted."),
        ]
        for key, name, help_text in gauges:
            if key in engine_stats:
                kind = "counter" if name.endswith("_total") else "gauge"
                metric(name, kind, help_text, [f"{name}{{{lab}}} {float(engine_stats[key])}"])
        metric("nanoseek_time_to_first_token_seconds", "histogram", "Time from request arrival to its first generated token.",
               self.ttft.render("nanoseek_time_to_first_token_seconds", lab))
        metric("nanoseek_e2e_request_latency_seconds", "histogram", "Time from request arrival to its last token.",
               self.e2e.render("nanoseek_e2e_request_latency_seconds", lab))
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
