"""Prometheus metrics (text exposition format 0.0.4), written out by hand: counters, gauges and histograms.

    qwen35_http_requests_total{method,route,status}     every HTTP request answered
    qwen35_requests_total{endpoint,finish_reason}       generation requests finished (stop/length/tool_calls/
                                                        abort/error)
    qwen35_prompt_tokens_total, qwen35_generation_tokens_total
    qwen35_num_requests_running / _waiting / _pending    in a batch / queued in the scheduler / not yet handed
                                                        to the engine thread (the queue length is waiting+pending)
    qwen35_kv_cache_blocks_used / _total, qwen35_kv_cache_usage_ratio
    qwen35_state_slots_used / _total, qwen35_state_slots_usage_ratio
    qwen35_time_to_first_token_seconds                  request received -> first generated token (histogram)
    qwen35_inter_token_latency_seconds                  between generated tokens of a request (histogram)
    qwen35_e2e_request_latency_seconds                  request received -> finished (histogram)
    qwen35_engine_steps_total, qwen35_engine_alive
    qwen35_spec_decode_num_drafts_total, _num_draft_tokens_total, _num_accepted_tokens_total,
    qwen35_spec_decode_num_accepted_tokens_per_pos_total{position}   MTP speculative decoding (when it is on)
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            key = tuple(labels)
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(tuple(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge read from a callback when scraped."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(float(self.read()))}"]


class CallbackCounter(Gauge):
    """A counter kept elsewhere (the engine's), read when scraped."""

    kind = "counter"


class CallbackCounterByLabel(_Metric):
    """Counters kept elsewhere, one per value of one label: `read()` gives [(label value, count)]."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, label: str, read: Callable[[], list[tuple[str, float]]]):
        super().__init__(name, help_text, (label,))
        self.read = read

    def render(self) -> list[str]:
        label = self.label_names[0]
        return self.header() + [f'{self.name}{{{label}="{v}"}} {_num(float(n))}' for v, n in self.read()]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]):
        super().__init__(name, help_text)
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, v: float, times: int = 1) -> None:
        if not math.isfinite(v) or times <= 0:
            return
        i = bisect.bisect_left(self.buckets, v)
        with self._lock:
            self._counts[i] += times
            self._sum += v * times
            self._count += times

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        lines = self.header()
        cum = 0
        for b, c in zip(self.buckets, counts, strict=False):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{_num(b)}"}} {cum}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {n}')
        lines.append(f"{self.name}_sum {_num(total)}")
        lines.append(f"{self.name}_count {n}")
        return lines


class ServerMetrics:
    """The server's metrics; `engine` is the AsyncEngine (its LLMEngine gives the cache usage)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        usage = self._usage
        self.http_requests = Counter("qwen35_http_requests_total", "HTTP requests answered.",
                                     ("method", "route", "status"))
        self.requests = Counter("qwen35_requests_total", "Generation requests finished, by endpoint and reason.",
                                ("endpoint", "finish_reason"))
        self.prompt_tokens = Counter("qwen35_prompt_tokens_total", "Prompt tokens of accepted requests.")
        self.generation_tokens = Counter("qwen35_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("qwen35_time_to_first_token_seconds",
                              "Time from receiving a request to its first generated token.", TTFT_BUCKETS)
        self.itl = Histogram("qwen35_inter_token_latency_seconds", "Time between generated tokens of a request.",
                             ITL_BUCKETS)
        self.e2e = Histogram("qwen35_e2e_request_latency_seconds", "Time from receiving a request to its end.",
                             E2E_BUCKETS)
        self.gauges = [
            Gauge("qwen35_num_requests_running", "Sequences in the running batch.", lambda: usage()["running"]),
            Gauge("qwen35_num_requests_waiting", "Sequences queued in the scheduler.", lambda: usage()["waiting"]),
            Gauge("qwen35_num_requests_pending", "Requests not yet handed to the engine thread.",
                  lambda: engine.num_pending),
            Gauge("qwen35_kv_cache_blocks_used", "KV cache blocks held by running sequences.",
                  lambda: usage()["held_blocks"]),
            Gauge("qwen35_kv_cache_blocks_total", "KV cache blocks the pool holds when it holds nothing else.",
                  lambda: usage()["num_blocks"]),
            Gauge("qwen35_kv_cache_usage_ratio", "Share of the cache pool running sequences hold, KV and GDN "
                  "states (0-1).",
                  lambda: _ratio(usage()["num_blocks"] - usage()["free_blocks"], usage()["num_blocks"])),
            Gauge("qwen35_state_slots_used", "GDN state slots of running sequences.", lambda: usage()["live_slots"]),
            Gauge("qwen35_state_slots_total", "GDN state slots the pool holds when it holds nothing else.",
                  lambda: usage()["num_slots"]),
            Gauge("qwen35_state_slots_usage_ratio", "Share of the pool's regions that hold running sequences' GDN "
                  "states (0-1).", lambda: _ratio(usage()["live_slots"], usage()["num_slots"])),
            Gauge("qwen35_engine_steps_total", "Engine steps run.", lambda: engine.step_count),
            CallbackCounter("qwen35_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                            lambda: self._prefix()["queried_tokens"]),
            CallbackCounter("qwen35_prefix_cache_hits_total", "Prompt tokens served from the prefix cache.",
                            lambda: self._prefix()["hit_tokens"]),
            Gauge("qwen35_engine_alive", "1 while the engine thread runs.", lambda: 1 if engine.alive else 0),
        ]
        if engine.engine.spec_stats is not None:
            stats = engine.engine.spec_stats
            self.gauges += [
                CallbackCounter("qwen35_spec_decode_num_drafts_total", "Sequence-steps that verified drafts.",
                                lambda: stats.num_drafts),
                CallbackCounter("qwen35_spec_decode_num_draft_tokens_total", "Draft tokens verified.",
                                lambda: stats.num_draft_tokens),
                CallbackCounter("qwen35_spec_decode_num_accepted_tokens_total", "Draft tokens accepted.",
                                lambda: stats.num_accepted_tokens),
                CallbackCounterByLabel("qwen35_spec_decode_num_accepted_tokens_per_pos_total",
                                       "Draft tokens accepted, by draft position (0: the first draft).", "position",
                                       lambda: [(str(j), n) for j, n in enumerate(stats.accepted_per_position)]),
            ]

    def _usage(self) -> dict[str, int]:
        return self.engine.engine.cache_usage()

    def _prefix(self) -> dict[str, int]:
        return self.engine.engine.prefix_cache_stats()

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.http_requests, self.requests, self.prompt_tokens, self.generation_tokens, *self.gauges,
                  self.ttft, self.itl, self.e2e):
            lines.extend(m.render())
        return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


__all__ = ["CONTENT_TYPE", "CallbackCounter", "Counter", "Gauge", "Histogram", "ServerMetrics"]
