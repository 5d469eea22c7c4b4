"""OpenTelemetry traces, exported over OTLP/HTTP; off (and the SDK never imported) unless
configured.

Configured the standard way, by the SDK's own environment variables: tracing is on when
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (and
``OTEL_SDK_DISABLED`` is not ``true``, ``OTEL_TRACES_EXPORTER`` not ``none``);
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER(_ARG)``,
``OTEL_BSP_*`` and ``OTEL_EXPORTER_OTLP_HEADERS`` apply as the SDK documents them. The
packages are the ``otel`` extra; with the variables set and the extra missing, the
process logs a warning and runs untraced.

Off, nothing here creates a span, a context or a carrier: every helper returns at its
first test of ``ENABLED`` (``span`` returns one shared null context), so a step pays a
few attribute reads. On, every process (web, worker pool process, scheduler, gateway)
has one SDK ``TracerProvider`` with a batch processor (re-created in forked children by
the SDK itself) and ``tracer()``'s spans.

Propagation is W3C trace context (``traceparent``), carried by the project itself
rather than by ``opentelemetry-instrumentation-celery``: steps are published by
``agents.core.dispatch`` without ``send_task`` (so Celery's publish signals, which
that instrumentation hooks, never fire), hand-offs travel as plain JSON to the model
gateway, and a step fired by the scheduler, a retry or a resumption carries no context
of its task at all. So the task row keeps the ``traceparent`` of the span that created
it (``AgentTask.trace_context``), every step message carries the publisher's
``traceparent`` in its headers, and ``step_parent`` chooses: the message's context when
it belongs to the task's trace, else the task's own (the message's then becomes a
link). A task that waited a day for an approval is one trace.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

logger = structlog.get_logger(__name__)

# Whether this process traces (``tracing_setup``). Read it as ``tracing.ENABLED``.
ENABLED = False
INSTRUMENTATION = "agents"
DEFAULT_SERVICE_NAME = "agents"
CONTENT_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_TRUE = {"1", "true", "yes", "on", "span_only", "span_and_event"}

_tracer: Tracer | None = None
_provider: Any = None
_configured = False
_capture_content = False
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()


def configured_endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """The OTLP endpoint the environment names ("" when tracing is off by it)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return ""
    return (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    ).strip()


def tracing_setup(*, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on for this process if the environment asks for it; True if on.

    Idempotent: the first call decides. ``exporter`` (tests) replaces the OTLP exporter:
    spans then go to it synchronously and the global provider is left alone.
    """
    global ENABLED, _tracer, _provider, _configured, _capture_content
    if _configured and exporter is None:
        return ENABLED
    _configured = True
    if exporter is None and not configured_endpoint():
        return False
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        logger.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed "
            "(pip install 'agent-runtime[otel]'); tracing stays off"
        )
        return False
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    # The sampler comes from OTEL_TRACES_SAMPLER / _ARG (the SDK reads them).
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION)
    _capture_content = os.environ.get(CONTENT_VARIABLE, "").strip().lower() in _TRUE
    ENABLED = True
    return True


def tracing_off() -> None:
    """Turn tracing off in this process (tests), flushing what was recorded."""
    global ENABLED, _tracer, _provider
    if _provider is not None:
        _provider.force_flush()
    ENABLED, _tracer, _provider = False, None, None


def tracing_flush(timeout_millis: int = 5000) -> None:
    """Export what is buffered now (a pool process about to exit)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis)


def tracer() -> Tracer | None:
    """This process's tracer; None when tracing is off."""
    return _tracer


def capture_content() -> bool:
    """Whether prompts and completions go on spans: the GenAI conventions' opt-in,
    ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``; off by default."""
    return ENABLED and _capture_content


def _context_of(traceparent: str) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def _span_context_of(traceparent: str) -> Any:
    from opentelemetry import trace

    return trace.get_current_span(_context_of(traceparent)).get_span_context()


def span(
    name: str,
    *,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
    parent: str | None = None,
    links: Sequence[str] = (),
) -> contextlib.AbstractContextManager[Span | None]:
    """A span named ``name``, current while the block runs, yielded (None when off).

    ``kind``: ``internal``, ``server``, ``client``, ``consumer`` or ``producer``;
    ``parent``: a ``traceparent`` to start under instead of the current span (a
    malformed one starts a new trace); ``links``: ``traceparent`` values to link to.
    An exception leaving the block is recorded on the span, which is marked an error.
    """
    if _tracer is None:
        return _NULL
    from opentelemetry.trace import Link, SpanKind

    context = _context_of(parent) if parent else None
    span_links = [Link(c) for link in links if (c := _span_context_of(link)).is_valid]
    return _tracer.start_as_current_span(
        name,
        context=context,
        kind=SpanKind[kind.upper()],
        attributes=dict(attributes or {}),
        links=span_links,
    )


def current_traceparent() -> str:
    """The current span's ``traceparent`` ("" when off or outside any span)."""
    if _tracer is None:
        return ""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


def trace_id_of(traceparent: str) -> str:
    """The trace id (32 hex digits) of a ``traceparent`` ("" if it has none)."""
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


def step_parent(*, stored: str, received: str) -> tuple[str, list[str]]:
    """The parent of a step's span and what it links to: ``received`` (the message's
    ``traceparent``) when it is of the task's trace (``stored``, the task row's), else
    the task's own context, linked to ``received`` (a request of another trace that
    resumed the task). Without a stored context (the task was created untraced), the
    message's context or a new trace."""
    if received and (not stored or trace_id_of(received) == trace_id_of(stored)):
        return received, []
    if stored:
        return stored, [received] if received else []
    return "", []


def current_trace_id() -> str:
    """The current span's trace id, 32 hex digits ("" when off or outside any span)."""
    if _tracer is None:
        return ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """Add an event to the current span (nothing when off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().add_event(name, dict(attributes or {}))


def attributes_set(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (nothing when off)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(dict(attributes))


def error_record(exc: BaseException) -> None:
    """Record ``exc`` on the current span and mark it an error (nothing when off): for
    errors the code handles (a failed step is retried, not raised)."""
    if _tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    current = trace.get_current_span()
    current.record_exception(exc)
    current.set_attribute("error.type", type(exc).__qualname__)
    current.set_status(Status(StatusCode.ERROR, str(exc)[:200]))


def trace_url(trace_id: str) -> str:
    """The operator's trace viewer's page of ``trace_id`` (``AGENTS_TRACE_URL_TEMPLATE``,
    with ``{trace_id}``); "" without a template or a trace id."""
    from django.conf import settings

    template = settings.AGENTS.get("TRACE_URL_TEMPLATE", "")
    return template.replace("{trace_id}", trace_id) if template and trace_id else ""


def add_trace_id(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: a line about a task (it has ``task_id``) gets the current
    trace's id as ``trace_id`` (in a step: the task's trace), unless it has one."""
    if _tracer is not None and "task_id" in event_dict and "trace_id" not in event_dict:
        trace_id = current_trace_id()
        if trace_id:
            event_dict["trace_id"] = trace_id
    return event_dict


_NAMED_GROUP = re.compile(r"\(\?P<(\w+)>[^)]*\)|<(?:\w+:)?(\w+)>")


def _route_template(route: str) -> str:
    """A URL pattern as the HTTP conventions' low-cardinality ``http.route``:
    ``api/tasks/(?P<pk>[^/]+)/approve/$`` -> ``/api/tasks/{pk}/approve/``."""
    if not route:
        return ""
    named = _NAMED_GROUP.sub(lambda m: "{" + (m.group(1) or m.group(2)) + "}", route)
    return "/" + named.removeprefix("^").removesuffix("$")


def request_middleware(get_response: Any) -> Any:
    """Django middleware: one ``SERVER`` span per HTTP request, named
    ``{method} {route}`` with the HTTP conventions' attributes, continuing a caller's
    ``traceparent``. Removed from the chain (``MiddlewareNotUsed``) when tracing is off.

    The project's own rather than ``opentelemetry-instrumentation-django``: that one
    must be installed before Django loads its settings in every entry point (manage.py,
    ASGI, WSGI), needs the ASGI instrumentation too under uvicorn, and pins exact
    versions of the API; this is a few lines, and costs nothing when off.
    """
    from django.core.exceptions import MiddlewareNotUsed

    if not tracing_setup():
        raise MiddlewareNotUsed

    def middleware(request: Any) -> Any:
        received = request.META.get("HTTP_TRACEPARENT", "")
        method = request.method or "GET"
        with span(
            method,
            kind="server",
            parent=received or None,
            attributes={"http.request.method": method, "url.path": request.path},
        ) as current:
            response = get_response(request)
            assert current is not None
            match = getattr(request, "resolver_match", None)
            route = _route_template(getattr(match, "route", "") if match is not None else "")
            if route:
                current.update_name(f"{method} {route}")
                current.set_attribute("http.route", route)
            current.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                from opentelemetry.trace import Status, StatusCode

                current.set_status(Status(StatusCode.ERROR))
            return response

    return middleware
