"""Prometheus metrics of model calls, observed in the worker that makes them.

Registered like ``agents_project.metrics``' step metrics (the default registry, so
prometheus-client's multiprocess mode collects them from pool processes through
``PROMETHEUS_MULTIPROC_DIR``), and served with them on ``/metrics`` and
``AGENTS_METRICS_PORT``:

- ``agents_llm_tokens_total{agent,model,kind}``: tokens billed, ``kind`` ``prompt`` or
  ``completion``;
- ``agents_llm_request_duration_seconds{model}``: time of each request to a model;
- ``agents_llm_cost_total{model}``: the calls' cost, in the currency of the prices in
  ``AGENTS_LLM_MODELS``;
- the model gateway's (``llm.gateway``, served on its own port):
  ``agents_llm_gateway_in_flight{model}`` (requests in flight now),
  ``agents_llm_gateway_queue_seconds`` (a hand-off published to the gateway taking it),
  ``agents_llm_gateway_first_token_seconds{model}`` (request sent to the first byte of
  the answer).

A reused (recorded) response is not a request and is not counted again.
"""

from __future__ import annotations

from decimal import Decimal

import structlog
from prometheus_client import Counter, Gauge, Histogram

from agents_project.metrics import renew_after_fork

logger = structlog.get_logger(__name__)

TOKENS = Counter(
    "agents_llm_tokens",
    "Tokens billed by model servers, by agent, model and kind (prompt, completion).",
    ["agent", "model", "kind"],
)
REQUEST_DURATION = Histogram(
    "agents_llm_request_duration_seconds",
    "Time a chat-completions request took, by model.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
)
COST = Counter("agents_llm_cost", "Cost of model calls, by model.", ["model"])
GATEWAY_IN_FLIGHT = Gauge(
    "agents_llm_gateway_in_flight",
    "Model requests the gateway has in flight now, by model.",
    ["model"],
    multiprocess_mode="livesum",
)
GATEWAY_QUEUE_TIME = Histogram(
    "agents_llm_gateway_queue_seconds",
    "Time a hand-off waited: published by a step to taken by the model gateway.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
GATEWAY_FIRST_TOKEN = Histogram(
    "agents_llm_gateway_first_token_seconds",
    "Time from a request sent by the gateway to the first byte of its answer, by model.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
)
renew_after_fork(TOKENS, REQUEST_DURATION, COST)


def model_call_observed(
    *,
    agent: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    duration_ms: float,
    cost: Decimal,
) -> None:
    """A model answered (not a reused response)."""
    try:
        TOKENS.labels(agent=agent, model=model, kind="prompt").inc(prompt_tokens)
        TOKENS.labels(agent=agent, model=model, kind="completion").inc(completion_tokens)
        REQUEST_DURATION.labels(model=model).observe(duration_ms / 1000)
        COST.labels(model=model).inc(float(cost))
    except Exception as exc:  # a metric must never fail a step
        logger.warning("model call metric not recorded", error=repr(exc))
