"""Circuit-breaker gauges, read at scrape time (a source of ``AGENTS_METRICS_SOURCES``)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric

from tools.selectors import breaker_states

BREAKER_STATES = ("closed", "open", "half-open")


def breaker_metrics() -> Iterable[Metric]:
    """Each circuit breaker's state and its count of failures in a row, at scrape time."""
    state = GaugeMetricFamily(
        "agents_circuit_breaker_state",
        "1 for each circuit breaker's current state (closed, open, half-open), else 0.",
        labels=["breaker", "state"],
    )
    failures = GaugeMetricFamily(
        "agents_circuit_breaker_failures",
        "Consecutive failures each circuit breaker has counted.",
        labels=["breaker"],
    )
    for breaker in breaker_states():
        for name in BREAKER_STATES:
            state.add_metric([breaker.name, name], 1 if breaker.state == name else 0)
        failures.add_metric([breaker.name], breaker.failures)
    return [state, failures]
