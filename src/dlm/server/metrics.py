"""Request counters and latency histograms, rendered in the Prometheus text exposition format (version 0.0.4).

Written by hand (a few lines) instead of adding `prometheus_client`: counters by (route, status), one latency
histogram per route, and whatever gauges the caller passes at render time (queue depth, batch statistics).

    metrics = Metrics(); metrics.observe("/v1/completions", 200, 0.42)
    text = metrics.render(extra=[("dlm_queue_depth", "gauge", "Requests waiting.", {(): 3})])
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if isinstance(x, float) and not float(x).is_integer() else str(int(x))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (route, status) -> count
        self._buckets: dict[str, list[int]] = {}  # route -> cumulative-to-be counts per bucket (+Inf last)
        self._sum: dict[str, float] = defaultdict(float)
        self._count: dict[str, int] = defaultdict(int)

    def observe(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, str(status))] += 1
            counts = self._buckets.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            i = next((i for i, le in enumerate(LATENCY_BUCKETS) if seconds <= le), len(LATENCY_BUCKETS))
            counts[i] += 1
            self._sum[route] += seconds
            self._count[route] += 1

    def render(self, extra: list[tuple[str, str, str, dict[Labels, float]]] = ()) -> str:
        """Prometheus text; `extra` adds (name, type, help, {labels: value}) families (counters and gauges)."""
        lines = ["# HELP dlm_requests_total HTTP requests answered, by route and status.",
                 "# TYPE dlm_requests_total counter"]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f"dlm_requests_total{_labels((('route', route), ('status', status)))} {n}")
            lines += ["# HELP dlm_request_latency_seconds Time from the request's arrival to its last byte.",
                      "# TYPE dlm_request_latency_seconds histogram"]
            for route, counts in sorted(self._buckets.items()):
                total = 0
                for le, c in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
                    total += c
                    labels = (("route", route), ("le", _number(le)))
                    lines.append(f"dlm_request_latency_seconds_bucket{_labels(labels)} {total}")
                lines.append(f"dlm_request_latency_seconds_sum{_labels((('route', route),))} {self._sum[route]!r}")
                lines.append(f"dlm_request_latency_seconds_count{_labels((('route', route),))} {self._count[route]}")
        for name, kind, help_text, samples in extra:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            for labels, value in samples.items():
                lines.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"
