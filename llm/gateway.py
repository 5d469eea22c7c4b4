"""The model gateway: one asyncio process makes every model call, so none holds a worker.

With ``AGENTS_LLM_GATEWAY`` on, a step of an ``llm`` task prepares its request (context
policy, budgets, the owner's daily tokens: everything checked before a request leaves)
and hands it off (``agents.core.handoffs``): the step ends, its pool process is free,
and the lease passes to the hand-off queue. ``manage.py llm_gateway`` runs this module:

1. it takes hand-offs from the queue (aio-pika, up to ``AGENTS_LLM_GATEWAY_PREFETCH``
   at once) and claims each one's lease (``handoff_claim``; a stale one is dropped);
2. a reply already recorded under the call's key is reused; else it waits for a slot
   under the model's and the owner's ``max_in_flight`` (Redis, shared by every
   gateway; sessions already under way first), the model's rpm/tpm limits and its
   endpoint's circuit breaker, then sends the request with the official SDK's
   ``AsyncOpenAI`` (aiohttp transport), bounded by the step's hard time limit and the
   task's deadline; a 429 or 503 with ``Retry-After`` is waited out and asked again,
   without spending an attempt;
3. the reply is recorded (``ModelCall``, key ``task : step : model``) in the same
   transaction that publishes the step again to the work queue and releases the lease
   (``handoff_return``); an error goes back the same way, and the step raises it as if
   it had made the call (``llm.client.error_from_note``);
4. every second one statement renews the leases of all calls in flight; a call whose
   lease is gone (its task cancelled, timed out, or taken over) is cancelled, which
   closes its connection;
5. SIGTERM: stop taking hand-offs, let calls in flight finish for up to
   ``AGENTS_LLM_GATEWAY_DRAIN`` seconds, give the rest back to the queue, exit 0.

Database work runs on ``AGENTS_LLM_GATEWAY_DB_THREADS`` threads (Django's ORM is
synchronous; each thread keeps one connection); a database outage makes it wait and
try again, holding the calls' messages. ``/healthz``, ``/readyz`` and ``/metrics`` are
served on ``AGENTS_LLM_GATEWAY_HEALTH_PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import aio_pika
import httpx2
import openai
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from openai.types.chat import ChatCompletion
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agents.core.dispatch import dead_letter_publish
from agents.core.engine import step_execute
from agents.core.faults import fault_point
from agents.core.handoffs import (
    HandOffClaim,
    handoff_claim,
    handoff_give_back,
    handoff_release,
    handoff_return,
    handoffs_renew,
)
from agents.core.leases import lease_owner_name
from agents.core.results import StepResult
from agents.definition import registered_agents
from agents.errors import PermanentError, RetryableError, RetryLater
from agents_project import tracing
from agents_project.errors import Backpressure, CircuitOpen
from llm import metrics, telemetry
from llm.agent import gateway_continues
from llm.client import (
    MalformedResponse,
    ModelConfig,
    error_as_note,
    model_config,
    rate_limit_acquire,
    rate_limit_correct,
    reply_from_completion,
    status_error,
)
from llm.models import ModelCall
from llm.selectors import model_call_find
from llm.services import model_api_key, model_call_record
from llm.streaming import ChunkAccumulator, delta_channel, delta_payload
from tools.breakers import Transition, breaker_call, breaker_open_for

logger = structlog.get_logger(__name__)

T = TypeVar("T")
DATABASE_ERRORS = (OperationalError, InterfaceError)
RENEW_INTERVAL = 1.0
# Seconds a closed breaker is taken as closed without reading it again.
BREAKER_READ_INTERVAL = 1.0
SLOT_POLL = 0.1


@dataclass
class Call:
    """One hand-off the gateway holds: its message, its lease, the work on it."""

    task_id: UUID
    step: int
    fence: int
    payload: dict[str, Any]
    message: aio_pika.abc.AbstractIncomingMessage
    work: asyncio.Task[None] | None = None
    # Why the work was cancelled: "lost" (the lease is gone) or "shutdown".
    stop: str = ""
    # When the step published it (``time.time()``), for the queue-wait metric.
    published_at: float | None = None
    claimed: bool = False
    recorded: bool = False
    slots: list[str] = field(default_factory=list)
    # The handing-off step's trace context (``agents_project.tracing``); "" untraced.
    traceparent: str = ""
    # The reply may be taken here (``llm.agent.gateway_continues``), and then is being:
    # the step's own claim renews its lease from then on, not the gateway's renewal.
    continues: bool = False
    continuing: bool = False

    @property
    def ident(self) -> tuple[UUID, int, int]:
        return (self.task_id, self.step, self.fence)


class Gateway:
    """The gateway process's state; ``run()`` until SIGTERM or SIGINT."""

    def __init__(self, *, node: str | None = None) -> None:
        self.node = node or f"llm-gateway@{socket.gethostname()}"
        self.holder = lease_owner_name(self.node)
        conf = settings.LLM
        self.db_pool = ThreadPoolExecutor(
            max_workers=conf["GATEWAY_DB_THREADS"], thread_name_prefix="gateway-db"
        )
        # By (task id, step, fence): one hand-off; a stale one of the same task may wait.
        self.calls: dict[tuple[UUID, int, int], Call] = {}
        self.clients: dict[tuple[str, str, float], openai.AsyncOpenAI] = {}
        self.stopping = asyncio.Event()
        self.consuming = False
        self.slots = Slots()
        self.breakers = Breakers()
        # Steps running here now (``_continue``), and at most how many.
        self.continuing = 0
        self.continue_max = int(conf["GATEWAY_CONTINUE"])

    # --- running ------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        health = await self._serve_health()
        connection_ = await aio_pika.connect_robust(settings.CELERY_BROKER_URL)
        try:
            channel = await connection_.channel()
            await channel.set_qos(prefetch_count=settings.LLM["GATEWAY_PREFETCH"])
            queue = await _declare(channel)
            tag = await queue.consume(self._on_message)
            self.consuming = True
            logger.info("model gateway consuming", queue=queue.name, holder=self.holder)
            renewer = asyncio.create_task(self._renew_forever())
            await self.stopping.wait()
            logger.info("model gateway stopping", in_flight=len(self.calls))
            await queue.cancel(tag)
            self.consuming = False
            await self._drain(settings.LLM["GATEWAY_DRAIN"])
            renewer.cancel()
        finally:
            with contextlib.suppress(Exception):
                await connection_.close()
            await health.cleanup()
            for client in self.clients.values():
                with contextlib.suppress(Exception):
                    await client.close()
            await self.slots.close()
            self.db_pool.shutdown(wait=True)

    async def _drain(self, grace: float) -> None:
        """Let calls in flight finish for ``grace`` seconds, then give the rest back."""
        deadline = time.monotonic() + grace
        while self.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # A step running here ends in milliseconds (no network): let it.
        rest = [c for c in self.calls.values() if not c.continuing]
        for call in rest:
            call.stop = "shutdown"
            if call.work is not None:
                call.work.cancel()
        works = [c.work for c in self.calls.values() if c.work is not None]
        if works:
            await asyncio.gather(*works, return_exceptions=True)

    async def db(self, func: Callable[..., T], /, **kwargs: Any) -> T:
        """``func(**kwargs)`` on a database thread; a database outage is waited out."""
        loop = asyncio.get_running_loop()
        delay = 0.5
        while True:
            try:
                return await loop.run_in_executor(self.db_pool, partial(_in_thread, func, kwargs))
            except DATABASE_ERRORS as exc:
                logger.warning("database unavailable; the gateway waits", error=repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # --- one hand-off ----------------------------------------------------------------------

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            body = json.loads(message.body)
            call = Call(
                task_id=UUID(body["task_id"]),
                step=int(body["step"]),
                fence=int(body["fence"]),
                payload=dict(body["payload"]),
                message=message,
                published_at=body.get("published_at"),
                traceparent=str(body.get("traceparent") or ""),
            )
        except (ValueError, KeyError, TypeError) as exc:
            logger.error("malformed hand-off dropped", error=repr(exc))
            await message.ack()
            return
        if call.ident in self.calls:
            # The same hand-off twice (a redelivery while this gateway holds it): the
            # first one answers for it.
            await message.ack()
            return
        self.calls[call.ident] = call
        call.work = asyncio.create_task(self._serve(call))

    async def _serve(self, call: Call) -> None:
        try:
            if not await self._claim(call):
                await call.message.ack()
                return
            call.claimed = True
            if call.published_at is not None:
                metrics.GATEWAY_QUEUE_TIME.observe(max(time.time() - call.published_at, 0))
            with self._chat_span(call):
                handed_back, also = await self._answer(call)
                # The step's next delivery continues this span.
                traceparent = tracing.current_traceparent()
            if call.continues and also is not None and self.continuing < self.continue_max:
                await self._continue(call, handed_back, also, traceparent)
                return
            while not await self._return(call, handed_back, also, traceparent):
                await asyncio.sleep(1.0)  # the broker refused: keep the step, try again
            fault_point("handoff_returned", step=call.step)
            await call.message.ack()
        except asyncio.CancelledError:
            await self._cancelled(call)
        except Exception as exc:  # a bug of ours: give the step back, never lose it
            logger.exception("hand-off failed; given back", error=repr(exc))
            with contextlib.suppress(Exception):
                await self.db(
                    handoff_give_back, task_id=call.task_id, fence=call.fence, holder=self.holder
                )
                await call.message.nack(requeue=True)
        finally:
            await self.slots.release(call)
            self.calls.pop(call.ident, None)

    async def _claim(self, call: Call) -> bool:
        while True:
            claim, call.recorded = await self.db(self._claim_and_find, call=call)
            if claim.claimed:
                return True
            if claim.wait <= 0:
                logger.info("stale hand-off dropped", task_id=str(call.task_id), step=call.step)
                return False
            await asyncio.sleep(claim.wait)  # a live holder: its lease may expire

    def _claim_and_find(self, call: Call) -> tuple[HandOffClaim, bool]:
        """(The claim, whether the call's reply is recorded already), on one thread."""
        claim = handoff_claim(
            task_id=call.task_id, step=call.step, fence=call.fence, holder=self.holder
        )
        found = claim.claimed and model_call_find(key=call.payload["key"]) is not None
        return claim, found

    async def _continue(
        self, call: Call, handed_back: dict[str, Any], record: Callable[[], Any], traceparent: str
    ) -> None:
        """Take the reply here: record it, then run the step that takes it on a database
        thread, as a worker would (``engine.step_execute``, under this gateway's lease,
        which its claim takes on), up to its next hand-off or its end. The hand-off's
        message is acknowledged only after: if this process dies first, the message goes
        to another gateway, or the sweep publishes the step once its lease lapses
        (``agents.core.scheduler``), and the recorded reply is reused, not asked again."""
        call.continuing = True
        self.continuing += 1
        try:
            result = await self.db(
                self._step_here, call=call, handed_back=handed_back, record=record,
                traceparent=traceparent,
            )  # fmt: skip
        finally:
            self.continuing -= 1
        if result == StepResult.DEAD_LETTERED:
            await self.db(self._dead_letter, call=call)
        elif result == StepResult.REQUEUE:
            # The database stayed away: its lease is released when it answers, and the
            # sweep publishes the step (this message would find the fence moved on).
            logger.warning("continued step given back", task_id=str(call.task_id))
        await call.message.ack()

    def _step_here(
        self, call: Call, handed_back: dict[str, Any], record: Callable[[], Any], traceparent: str
    ) -> StepResult:
        record()
        fault_point("handoff_recorded", step=call.step)
        return step_execute(
            task_id=call.task_id,
            step=call.step,
            message={
                "task": "agents.run_step",
                "id": "",
                "args": [str(call.task_id), call.step],
                "delivery_info": {"routing_key": settings.AGENTS["HANDOFF_QUEUE"]},
            },
            node=self.node,
            handed_back=handed_back,
            traceparent=traceparent,
            owner=self.holder,
        )

    def _dead_letter(self, call: Call) -> None:
        agent = registered_agents().get(str(call.payload.get("agent") or "llm"))
        if agent is None:
            return
        try:
            dead_letter_publish(task_id=call.task_id, step=call.step, agent=agent)
        except Backpressure:
            logger.error("dead letter not put in the DLQ", task_id=str(call.task_id))

    async def _cancelled(self, call: Call) -> None:
        with contextlib.suppress(Exception):
            if call.stop == "shutdown":
                await self.db(
                    handoff_give_back, task_id=call.task_id, fence=call.fence, holder=self.holder
                )
                await call.message.nack(requeue=True)
            else:
                await self.db(
                    handoff_release, task_id=call.task_id, fence=call.fence, holder=self.holder
                )
                await call.message.ack()
        logger.info("model call stopped", task_id=str(call.task_id), why=call.stop or "cancel")

    def _chat_span(self, call: Call) -> contextlib.AbstractContextManager[Any]:
        """The model call's span, under the handing-off step's, unless the reply is
        recorded already (the step reuses it and says so on its own span)."""
        if not tracing.ENABLED or call.recorded:
            return contextlib.nullcontext()
        model = str(call.payload.get("model") or "")
        return telemetry.chat_span(
            model=model,
            base_url=str(
                settings.LLM["MODELS"].get(model, {}).get("base_url") or settings.LLM["BASE_URL"]
            ),
            key=str(call.payload.get("key") or ""),
            parent=call.traceparent or None,
        )

    async def _return(
        self,
        call: Call,
        handed_back: dict[str, Any],
        also: Callable[[], Any] | None,
        traceparent: str = "",
    ) -> bool:
        try:
            await self.db(
                handoff_return,
                task_id=call.task_id,
                step=call.step,
                fence=call.fence,
                holder=self.holder,
                agent_name=str(call.payload.get("agent") or "llm"),
                handed_back=handed_back,
                also=also,
                traceparent=traceparent,
            )
        except Backpressure:
            return False
        return True

    async def _answer(self, call: Call) -> tuple[dict[str, Any], Callable[[], Any] | None]:
        """What to hand back: ``({"key", "recorded"} and the record's write)`` or
        ``({"key", "error"}, None)``."""
        payload = call.payload
        key = payload["key"]
        if call.recorded:
            return {"key": key}, None  # recorded before: the step reuses it
        transitions: list[Transition] = []
        try:
            config = model_config(payload["model"])
            api_key = await self._api_key(call, config)
            secrets = await self._content_secrets(call, api_key)
            telemetry.chat_request_record(payload["messages"], secrets=secrets)
            await self._admit(call, config)
            completion, duration_ms = await self._request(call, config, api_key, transitions)
            reply = reply_from_completion(
                completion, duration_ms, int(payload.get("estimated_tokens") or 0)
            )
            telemetry.chat_reply_record(reply, model=config.name, secrets=secrets)
            call.continues = gateway_continues(str(payload.get("agent") or ""), reply.tool_calls)
        except (PermanentError, RetryableError, RetryLater) as exc:
            tracing.error_record(exc)
            note = {"key": key, "error": error_as_note(exc)}
            return _with_breaker(note, transitions), None
        if config.tpm:
            await self.db(
                rate_limit_correct,
                config=config,
                estimated=int(payload.get("estimated_tokens") or 0),
                used=reply.total_tokens,
            )

        def record() -> None:
            model_call, created = model_call_record(
                task_id=call.task_id,
                owner_id=int(payload["owner_id"]),
                step=call.step,
                key=key,
                purpose=payload.get("purpose") or ModelCall.Purpose.REPLY,
                config=config,
                reply=reply,
            )
            if created:
                metrics.model_call_observed(
                    agent=str(payload.get("agent", "")),
                    model=config.name,
                    prompt_tokens=reply.prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                    duration_ms=reply.duration_ms,
                    cost=model_call.cost,
                )

        return _with_breaker(recorded_note(payload), transitions), record

    async def _api_key(self, call: Call, config: ModelConfig) -> str:
        if not config.api_key_credential:
            return config.api_key  # the deployment's key: no thread, no database
        return await self.db(
            model_api_key,
            config=config,
            task_id=call.task_id,
            owner_id=int(call.payload["owner_id"]),
        )

    async def _content_secrets(self, call: Call, api_key: str) -> tuple[str, ...]:
        """What the span's captured content must not show (read only when captured)."""
        if not tracing.capture_content():
            return ()
        return await self.db(
            telemetry.content_secrets,
            task_id=call.task_id,
            owner_id=int(call.payload["owner_id"]),
            api_key=api_key,
        )

    async def _admit(self, call: Call, config: ModelConfig) -> None:
        """Wait for the model's and owner's slots and rate limits, until the deadline."""
        deadline = float(call.payload.get("deadline") or time.time() + config.timeout)
        own = settings.LLM["MODELS"].get(config.name, {})
        owner = int(call.payload["owner_id"])
        limits = []
        if own.get("max_in_flight"):
            limits.append((f"model:{config.name}", int(own["max_in_flight"])))
        if own.get("owner_max_in_flight"):
            limits.append((f"owner:{owner}:{config.name}", int(own["owner_max_in_flight"])))
        if limits:
            # Sessions under way first: a later step goes before every first step.
            priority = (0 if call.step > 1 else 1, time.monotonic())
            if not await self.slots.acquire(call, limits, priority, deadline):
                raise RetryableError(
                    f"model {config.name!r}: no slot under max_in_flight before the deadline"
                )
        if not (config.rpm or config.tpm):
            return
        tokens = int(call.payload.get("estimated_tokens") or 0)
        while True:
            try:
                return await self.db(rate_limit_acquire, config=config, tokens=tokens)
            except RetryLater as exc:
                if time.time() + exc.delay >= deadline:
                    raise
                await asyncio.sleep(exc.delay)

    async def _request(
        self, call: Call, config: ModelConfig, api_key: str, transitions: list[Transition]
    ) -> tuple[Any, float]:
        """The completion and its duration (ms). 429 and 503 with ``Retry-After`` are
        waited out and asked again while the deadline allows."""
        payload = call.payload
        deadline = float(payload.get("deadline") or time.time() + config.timeout)
        client = self._client(config, api_key)
        extra: dict[str, Any] = {"tools": payload["tools"]} if payload.get("tools") else {}
        while True:
            await self.breakers.check(self, config.breaker)
            remaining = deadline - time.time()
            if remaining <= 0:
                raise RetryableError(f"model {config.name!r}: the step's time ran out")
            started = time.monotonic()
            outcome: Any
            metrics.GATEWAY_IN_FLIGHT.labels(model=config.name).inc()
            try:
                async with asyncio.timeout(min(remaining, config.timeout)):
                    if payload.get("stream"):
                        outcome = await self._streamed(call, config, client, extra, started)
                    else:
                        # The SDK's generic POST (its README's "undocumented endpoints"):
                        # the messages go out as they were prepared, without the typed
                        # create()'s walk over every message (a tenth of this process's CPU).
                        outcome = await client.post(
                            "/chat/completions",
                            body={"model": config.name, "messages": payload["messages"], **extra},
                            cast_to=ChatCompletion,
                            options={"headers": {"X-Agents-Call": payload["key"]}},
                        )
                        metrics.GATEWAY_FIRST_TOKEN.labels(model=config.name).observe(
                            time.monotonic() - started
                        )
            except TimeoutError:
                outcome = RetryableError(
                    f"model {config.name!r}: no answer within "
                    f"{min(remaining, config.timeout):.3g} s"
                )
            except openai.APITimeoutError:
                outcome = RetryableError(
                    f"model {config.name!r}: no answer within {config.timeout:g} s"
                )
            except openai.APIConnectionError as exc:
                outcome = RetryableError(f"model {config.name!r}: connection failed: {exc}")
            except openai.APIStatusError as exc:
                outcome = status_error(config, exc)
            except ValueError as exc:
                outcome = MalformedResponse(f"model {config.name!r}: malformed answer: {exc}")
            finally:
                metrics.GATEWAY_IN_FLIGHT.labels(model=config.name).dec()
            duration_ms = round((time.monotonic() - started) * 1000, 3)
            outcome = await self.breakers.report(self, config, outcome, transitions)
            waits = isinstance(outcome, RetryLater) and not isinstance(outcome, CircuitOpen)
            if waits and time.time() + outcome.delay < deadline:
                logger.info("model asks to wait", delay=outcome.delay, key=payload["key"])
                await asyncio.sleep(outcome.delay)
                continue
            if isinstance(outcome, Exception):
                raise outcome
            return outcome, duration_ms

    async def _streamed(
        self,
        call: Call,
        config: ModelConfig,
        client: openai.AsyncOpenAI,
        extra: dict[str, Any],
        started: float,
    ) -> ChatCompletion:
        """The reply, streamed: each piece of text is published as it arrives
        (``llm.streaming``), the whole completion rebuilt from the chunks."""
        payload = call.payload
        chunks = await client.chat.completions.create(  # type: ignore[call-overload]
            model=config.name,
            messages=payload["messages"],
            extra_headers={"X-Agents-Call": payload["key"]},
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        accumulator = ChunkAccumulator()
        index = 0
        first = True
        async for chunk in chunks:
            if first:
                first = False
                metrics.GATEWAY_FIRST_TOKEN.labels(model=config.name).observe(
                    time.monotonic() - started
                )
            text = accumulator.feed(chunk)
            if text and settings.REDIS_URL:
                message = delta_payload(key=payload["key"], step=call.step, index=index, delta=text)
                index += 1
                with contextlib.suppress(Exception):
                    await self.slots.client().publish(delta_channel(call.task_id), message)
        return ChatCompletion.model_validate(accumulator.completion())

    def _client(self, config: ModelConfig, api_key: str) -> openai.AsyncOpenAI:
        # One client (and connection pool) per server and key; the SDK's retries are off
        # (the gateway decides), and its pool is not the limit (max_in_flight is).
        key = (config.base_url, api_key, config.timeout)
        client = self.clients.get(key)
        if client is None:
            client = self.clients[key] = openai.AsyncOpenAI(
                base_url=config.base_url,
                api_key=api_key or "none",
                timeout=config.timeout,
                max_retries=0,
                http_client=openai.DefaultAioHttpClient(
                    limits=httpx2.Limits(max_connections=100_000, max_keepalive_connections=1000),
                    timeout=config.timeout,
                ),
            )
        return client

    # --- leases ---------------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(RENEW_INTERVAL)
            claimed = [
                c for c in self.calls.values() if c.claimed and not c.stop and not c.continuing
            ]
            if not claimed:
                continue
            held = [(c.task_id, c.fence) for c in claimed]
            try:
                kept = await self.db(handoffs_renew, holder=self.holder, held=held)
            except Exception as exc:
                logger.warning("lease renewal failed", error=repr(exc))
                continue
            for call in claimed:
                # A call whose return committed meanwhile is gone from self.calls.
                if call.task_id not in kept and self.calls.get(call.ident) is call:
                    call.stop = "lost"
                    if call.work is not None:
                        call.work.cancel()
            await self.slots.renew([c for c in claimed if c.slots])

    # --- health ---------------------------------------------------------------------------

    async def _serve_health(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = settings.LLM["GATEWAY_HEALTH_PORT"]
        if port > 0:
            await web.TCPSite(runner, settings.AGENTS["WORKER_HEALTH_HOST"], port).start()
        return runner

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "in_flight": len(self.calls)})

    async def _readyz(self, request: web.Request) -> web.Response:
        ok = self.consuming and not self.stopping.is_set()
        if ok:
            try:
                await self.db(_database_answers)
            except Exception:
                ok = False
        return web.json_response(
            {"status": "ok" if ok else "unavailable", "consuming": self.consuming},
            status=200 if ok else 503,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        token = settings.METRICS_TOKEN
        if token and request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401, text="metrics need the bearer token\n")
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _in_thread(func: Callable[..., T], kwargs: dict[str, Any]) -> T:
    try:
        return func(**kwargs)
    except DATABASE_ERRORS:
        with contextlib.suppress(Exception):
            connection.close()
        raise


def _database_answers() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _with_breaker(note: dict[str, Any], transitions: list[Transition]) -> dict[str, Any]:
    if transitions:
        note["breaker"] = [t.as_payload() for t in transitions]
    return note


async def _declare(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
    """The hand-off queue as ``agents_project.topology.handoff_queue`` declares it."""
    from agents_project.topology import handoff_queue

    spec = handoff_queue(settings.AGENTS)
    exchange = await channel.declare_exchange(
        spec.exchange.name, aio_pika.ExchangeType.DIRECT, durable=True
    )
    queue = await channel.declare_queue(
        spec.name, durable=True, arguments=dict(getattr(spec, "queue_arguments", None) or {})
    )
    await queue.bind(exchange, routing_key=spec.routing_key)
    return queue


# --- circuit breakers ----------------------------------------------------------------------


class Breakers:
    """The endpoints' circuit breakers (``tools.breakers``, shared through Redis), read
    at most once a second per endpoint while they are closed: a call checks the state
    before it is sent and reports its outcome after. A success is reported only after
    a failure this process reported (it resets the breaker's count of failures in a
    row); every failure is reported."""

    def __init__(self) -> None:
        self._closed_until: dict[str, float] = {}
        self._failed: set[str] = set()

    async def check(self, gateway: Gateway, name: str) -> None:
        """Raise ``CircuitOpen`` if the breaker ``name`` refuses calls now."""
        if self._closed_until.get(name, 0.0) > time.monotonic():
            return
        opened = await gateway.db(breaker_open_for, name=name)
        if opened is not None:
            self._closed_until.pop(name, None)
            raise opened
        self._closed_until[name] = time.monotonic() + BREAKER_READ_INTERVAL

    async def report(
        self, gateway: Gateway, config: ModelConfig, outcome: Any, transitions: list[Transition]
    ) -> Any:
        """Count a call's ``outcome`` (a completion or an exception) in its breaker, and
        return what the call ends with: the ``outcome``, or for a failure that opened
        the breaker (the one that reached ``AGENTS_BREAKER_FAIL_MAX``, or a failed
        trial call) the ``CircuitOpen`` that ``breaker_call`` raises for it, as in a
        worker, so that the step waits for the breaker without spending an attempt."""
        failed = isinstance(outcome, Exception)
        name = config.breaker
        if not failed and name not in self._failed:
            return outcome
        if failed:
            self._failed.add(name)
            self._closed_until.pop(name, None)
        else:
            self._failed.discard(name)

        def replay() -> None:
            if failed:
                raise outcome

        def report() -> CircuitOpen | None:
            try:
                breaker_call(
                    name=name, func=replay, trial_timeout=config.timeout, transitions=transitions
                )
            except CircuitOpen as exc:
                return exc
            except Exception:
                return None  # the outcome itself, replayed
            return None

        opened = await gateway.db(report)
        return opened if failed and opened is not None else outcome


# --- max_in_flight: slots in Redis, shared by every gateway --------------------------------

_ACQUIRE = """
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
  if redis.call('ZSCORE', key, ARGV[3]) == false
     and redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then
    return 0
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[2], ARGV[3])
  redis.call('EXPIRE', key, 3600)
end
return 1
"""


class Slots:
    """Slots under ``max_in_flight`` limits: a sorted set per limit in Redis (member: the
    call's key, score: when the slot lapses unless renewed, so a dead gateway's slots
    come back by themselves); every limit of a call is taken at once or none is. Waiting
    calls are tried in priority order (sessions under way first), every
    ``SLOT_POLL`` seconds and whenever a slot of this process is released."""

    def __init__(self) -> None:
        self._redis: aioredis.Redis | None = None
        self._waiting: list[tuple[tuple[int, float], int, asyncio.Future[bool], Call, list]] = []
        self._counter = itertools.count()
        self._kick = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None

    def client(self) -> aioredis.Redis:
        """The gateway's Redis client (asyncio)."""
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(settings.REDIS_URL)
        return self._redis

    def _key(self, name: str) -> str:
        return f"{settings.REDIS_KEY_PREFIX}:llm-inflight:{name}"

    async def acquire(
        self,
        call: Call,
        limits: list[tuple[str, int]],
        priority: tuple[int, float],
        deadline: float,
    ) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._counter), future, call, limits))
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._admit_forever())
        self._kick.set()
        try:
            async with asyncio.timeout(max(deadline - time.time(), 0.001)):
                return await future
        except TimeoutError:
            return False
        finally:
            if not future.done():
                future.cancel()

    async def _admit_forever(self) -> None:
        script = self.client().register_script(_ACQUIRE)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SLOT_POLL):
                    await self._kick.wait()
            self._kick.clear()
            blocked: set[str] = set()
            kept = []
            while self._waiting:
                entry = heapq.heappop(self._waiting)
                _, _, future, call, limits = entry
                if future.done():
                    continue
                names = [name for name, _ in limits]
                if blocked.intersection(names):
                    kept.append(entry)
                    continue
                now = time.time()
                try:
                    got = await script(
                        keys=[self._key(n) for n in names],
                        args=[now, now + _slot_ttl(), call.payload["key"]]
                        + [limit for _, limit in limits],
                    )
                except Exception as exc:  # Redis away: no limit rather than no calls
                    logger.warning("max_in_flight unavailable; calling unlimited", error=repr(exc))
                    got = 1
                    names = []
                if got:
                    call.slots = [self._key(n) for n in names]
                    future.set_result(True)
                else:
                    blocked.update(names)
                    kept.append(entry)
            for entry in kept:
                heapq.heappush(self._waiting, entry)

    async def renew(self, calls: list[Call]) -> None:
        if not calls:
            return
        with contextlib.suppress(Exception):
            pipe = self.client().pipeline(transaction=False)
            lapse = time.time() + _slot_ttl()
            for call in calls:
                for key in call.slots:
                    pipe.zadd(key, {call.payload["key"]: lapse}, xx=True)
            await pipe.execute()

    async def release(self, call: Call) -> None:
        if not call.slots:
            return
        with contextlib.suppress(Exception):
            for key in call.slots:
                await self.client().zrem(key, call.payload["key"])
        call.slots = []
        self._kick.set()

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()


def recorded_note(payload: dict[str, Any]) -> dict[str, Any]:
    """What the gateway hands back with a reply it recorded for the hand-off ``payload``:
    its key, and what the step's plan sent (``messages_sent``, ``estimated_tokens``),
    so the step takes the reply without planning the request again."""
    return {
        "key": payload["key"],
        "recorded": True,
        "messages_sent": len(payload["messages"]),
        "estimated_tokens": int(payload.get("estimated_tokens") or 0),
    }


def _slot_ttl() -> float:
    return 3 * max(settings.AGENTS["LEASE_TTL"], RENEW_INTERVAL * 3)


def gateway_run() -> None:
    """Run the model gateway until SIGTERM or SIGINT (``manage.py llm_gateway``)."""
    asyncio.run(Gateway().run())
