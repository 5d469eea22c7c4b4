"""Tracing in the test process: spans kept in memory, steps run from the real queue with
the ``traceparent`` their message carries, as a worker runs them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from uuid import UUID

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.core.engine import step_execute
from agents_project import tracing
from tests.helpers import WORK_QUEUE, broker


@contextlib.contextmanager
def spans_in_memory() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process while the block runs, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    tracing.tracing_setup(exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.tracing_off()


def run_traced() -> int:
    """Run every step message on the queue here, as a worker would; how many ran."""
    ran = 0
    with broker() as conn:
        queue = WORK_QUEUE(conn.default_channel)
        while (message := queue.get(no_ack=False)) is not None:
            task_id, step = message.payload[0]
            step_execute(
                task_id=UUID(task_id),
                step=step,
                message={"args": [task_id, step]},
                traceparent=message.headers.get("traceparent", ""),
            )
            message.ack()
            ran += 1
    return ran
