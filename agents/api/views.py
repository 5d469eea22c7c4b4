"""API views: parse, call a service or selector, serialize. Nothing else happens here.

A user sees and acts on their own tasks; the model permissions of
``agents.permissions`` extend that (``view_agenttask``: read every task,
``change_agenttask``: operate them); ``is_staff`` alone grants nothing. A task the user
may not see is a 404, never a 403, so its existence is not disclosed; one they may read
but not operate is a 403. The services enforce the same rule.
"""

from __future__ import annotations

from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import Resolver404, resolve, reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from redis import RedisError
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action, api_view, permission_classes
from rest_framework.exceptions import NotFound
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agents import permissions
from agents.api.authentication import api_token_expires_at, api_token_rotate
from agents.api.errors import Unavailable
from agents.api.events import EVENTS_DESCRIPTION, EventStreamRenderer, last_event_id
from agents.api.pagination import NewestFirstPagination, seek_page
from agents.api.permissions import MayViewBreakers
from agents.api.schema import errors
from agents.api.serializers import (
    ApproveSerializer,
    AuditEventSerializer,
    AuditPageSerializer,
    BreakerSerializer,
    CheckpointPageSerializer,
    CheckpointSerializer,
    DeadLetterQuerySerializer,
    DeadLetterSerializer,
    ErrorSerializer,
    HoldSerializer,
    ReplaySerializer,
    ScheduleDetailSerializer,
    ScheduleSerializer,
    ScheduleWriteSerializer,
    SeekQuerySerializer,
    SignalOutSerializer,
    SignalSerializer,
    TaskBatchCreateSerializer,
    TaskCreateSerializer,
    TaskDetailSerializer,
    TaskListItemSerializer,
    TaskQuerySerializer,
    TaskSerializer,
    TokenSerializer,
)
from agents.api.streams import holding, holding_async, stream_slot_acquire
from agents.core.dead_letters import dead_letter_requeue
from agents.core.suspensions import task_approve, task_cancel, task_signal
from agents.diagnosis import with_dead_letter_error
from agents.events import event_stream, event_stream_async, task_events_finished
from agents.models import AgentTask, Schedule
from agents.retention import task_legal_hold_set
from agents.schedules import (
    schedule_create,
    schedule_delete,
    schedule_get,
    schedule_pause,
    schedule_update,
    schedules_visible_to,
)
from agents.selectors import (
    dead_letter_get,
    dead_letters_visible_to,
    task_checkpoints,
    task_children,
    task_get,
    task_list,
    tasks_visible_to,
)
from agents.services import task_replay, task_start, tasks_start
from audit.models import DeadLetter
from audit.selectors import audit_events
from audit.services import user_actor
from tools.selectors import breaker_states


def _valid(serializer_class: type[serializers.Serializer], data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def _query(serializer_class: type[serializers.Serializer], request: Request) -> dict[str, Any]:
    # A plain dict, not the QueryDict: DRF would read "?status=" as "no status given";
    # an empty value is refused like any other that is not one of the allowed ones.
    return _valid(serializer_class, request.query_params.dict())


class ScheduleViewSet(viewsets.GenericViewSet):
    """Schedules: start a task of an agent at every slot of a cron expression or an
    interval (``agents.schedules``). A user sees and changes their own (with
    ``view_schedule`` / ``change_schedule``: all); others' are a 404."""

    serializer_class = ScheduleSerializer
    pagination_class = NewestFirstPagination
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return Schedule.objects.none()
        return schedules_visible_to(self.request.user)

    @extend_schema(summary="List your schedules", responses=ScheduleSerializer(many=True))
    def list(self, request: Request) -> Response:
        page = self.paginate_queryset(schedules_visible_to(request.user).order_by("-created_at"))
        return self.get_paginated_response(ScheduleSerializer(page, many=True).data)

    @extend_schema(
        summary="Create a schedule (you are its owner)",
        request=ScheduleWriteSerializer,
        examples=[
            OpenApiExample(
                "Every morning at 8 in Berlin",
                request_only=True,
                value={
                    "agent": "llm",
                    "input": {"prompt": "Summarise yesterday's tickets"},
                    "cron": "0 8 * * *",
                    "timezone": "Europe/Berlin",
                    "overlap": "skip",
                    "catch_up": "one",
                },
            )
        ],
        responses={201: ScheduleDetailSerializer},
    )
    def create(self, request: Request) -> Response:
        data = _valid(ScheduleWriteSerializer, request.data)
        schedule = schedule_create(owner=request.user, **data)
        return Response(
            ScheduleDetailSerializer(schedule).data,
            status=status.HTTP_201_CREATED,
            headers={"Location": reverse("schedule-detail", args=[schedule.pk])},
        )

    @extend_schema(
        summary="One schedule and its latest firings", responses=ScheduleDetailSerializer
    )
    def retrieve(self, request: Request, pk: str) -> Response:
        schedule = schedule_get(schedule_id=pk, user=request.user)
        return Response(ScheduleDetailSerializer(schedule).data)

    @extend_schema(
        summary="Change a schedule (a new cron, interval or time zone starts from the next slot)",
        request=ScheduleWriteSerializer(partial=True),
        responses=ScheduleDetailSerializer,
    )
    def partial_update(self, request: Request, pk: str) -> Response:
        serializer = ScheduleWriteSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        schedule = schedule_update(schedule_id=pk, user=request.user, **serializer.validated_data)
        return Response(ScheduleDetailSerializer(schedule).data)

    @extend_schema(summary="Remove a schedule (its tasks stay)", responses={204: None})
    def destroy(self, request: Request, pk: str) -> Response:
        schedule_delete(schedule_id=pk, user=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(summary="Pause a schedule", request=None, responses=ScheduleDetailSerializer)
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str) -> Response:
        schedule = schedule_pause(schedule_id=pk, user=request.user, paused=True)
        return Response(ScheduleDetailSerializer(schedule).data)

    @extend_schema(
        summary="Resume a schedule (from the next slot after now)",
        request=None,
        responses=ScheduleDetailSerializer,
    )
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str) -> Response:
        schedule = schedule_pause(schedule_id=pk, user=request.user, paused=False)
        return Response(ScheduleDetailSerializer(schedule).data)


class TaskViewSet(viewsets.GenericViewSet):
    """Agent tasks: start, follow, and operate them."""

    serializer_class = TaskSerializer
    pagination_class = NewestFirstPagination
    # Any id reaches the view, which answers a malformed one with a JSON 404.
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> Any:
        # Only for schema generation (the path parameter's type); handlers use selectors.
        if getattr(self, "swagger_fake_view", False):
            return AgentTask.objects.none()
        return tasks_visible_to(self.request.user)

    @extend_schema(
        summary="List your tasks (with view_agenttask: all), newest first",
        parameters=[TaskQuerySerializer],
        responses=TaskListItemSerializer(many=True),
    )
    def list(self, request: Request) -> Response:
        query = _query(TaskQuerySerializer, request)
        tasks = with_dead_letter_error(task_list(user=request.user, **query))
        page = self.paginate_queryset(tasks)
        return self.get_paginated_response(TaskListItemSerializer(page, many=True).data)

    @extend_schema(
        summary="Start a task",
        request=TaskCreateSerializer,
        examples=[
            OpenApiExample(
                "A scripted agent that waits for an approval",
                request_only=True,
                value={
                    "agent": "scripted",
                    "input": {
                        "script": [
                            {"think": "check the refund"},
                            {"tool": "calc", "args": {"expression": "40 * 1.08"}},
                            {"approval": "Refund 43.20?"},
                            {"final": "refunded"},
                        ]
                    },
                    "idempotency_key": "refund-1234",
                    "timeout_seconds": 3600,
                },
            )
        ],
        responses={
            201: TaskSerializer,
            200: OpenApiResponse(TaskSerializer, description="The task this key created."),
            **errors(503),
        },
    )
    def create(self, request: Request) -> Response:
        data = _valid(TaskCreateSerializer, request.data)
        task, created = task_start(owner=request.user, **data)
        return Response(
            TaskSerializer(task).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
            headers={"Location": reverse("task-detail", args=[task.pk])},
        )

    @extend_schema(
        summary="Start many tasks of one agent at once (all or none)",
        request=TaskBatchCreateSerializer,
        examples=[
            OpenApiExample(
                "Two llm sessions",
                request_only=True,
                value={"agent": "llm", "inputs": [{"prompt": "a"}, {"prompt": "b"}]},
            )
        ],
        responses={201: TaskSerializer(many=True), **errors(503)},
    )
    @action(detail=False, methods=["post"], url_path="batch")
    def batch(self, request: Request) -> Response:
        data = _valid(TaskBatchCreateSerializer, request.data)
        tasks = tasks_start(owner=request.user, **data)
        body = TaskSerializer(tasks, many=True, context={"created": True}).data
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(summary="One task, with why it is where it is", responses=TaskDetailSerializer)
    def retrieve(self, request: Request, pk: str) -> Response:
        return Response(TaskDetailSerializer(task_get(task_id=pk, user=request.user)).data)

    @extend_schema(
        summary="The task's audit trail, in order, a page at a time",
        parameters=[SeekQuerySerializer],
        responses=AuditPageSerializer,
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def audit(self, request: Request, pk: str) -> Response:
        query = _query(SeekQuerySerializer, request)
        task = task_get(task_id=pk, user=request.user)
        events = audit_events(task_id=task.pk, after_seq=query.get("after", 0))
        return seek_page(
            request, events, key="seq", limit=query["limit"], serializer=AuditEventSerializer
        )

    @extend_schema(
        summary="The task's audit events, live, as Server-Sent Events",
        description=EVENTS_DESCRIPTION,
        parameters=[
            OpenApiParameter(
                "last_event_id",
                OpenApiTypes.INT,
                OpenApiParameter.QUERY,
                description="Resume after this event (a sequence number). The "
                "`Last-Event-ID` header, which EventSource sends on reconnecting, wins.",
            ),
            OpenApiParameter(
                "Last-Event-ID",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                description="Resume after this event (a sequence number).",
            ),
        ],
        responses={
            (200, "text/event-stream"): OpenApiResponse(
                OpenApiTypes.STR,
                description="`id: SEQ`, `event: TYPE`, `data: JSON` (an audit entry) per "
                "event; a final `event: end` once the task has ended.",
            ),
            204: OpenApiResponse(
                description="The task has ended and there is nothing after Last-Event-ID."
            ),
            **errors(400, 404, 429),
        },
    )
    @action(
        detail=True,
        methods=["get"],
        pagination_class=None,
        renderer_classes=[JSONRenderer, EventStreamRenderer],
    )
    def events(self, request: Request, pk: str) -> HttpResponseBase:
        task = task_get(task_id=pk, user=request.user)
        after = last_event_id(request)
        if task_events_finished(task_id=task.pk, after_seq=after):
            return HttpResponse(status=status.HTTP_204_NO_CONTENT)
        slot = stream_slot_acquire(request.user.pk)  # 429 past the limits
        if isinstance(request._request, ASGIRequest):
            stream: Any = holding_async(slot, event_stream_async(task_id=task.pk, after_seq=after))
        else:
            stream = holding(slot, event_stream(task_id=task.pk, after_seq=after))
        response = StreamingHttpResponse(stream, content_type="text/event-stream; charset=utf-8")
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        return response

    @extend_schema(
        summary="The child tasks this task started, in the order it started them",
        responses=TaskListItemSerializer(many=True),
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def children(self, request: Request, pk: str) -> Response:
        task = task_get(task_id=pk, user=request.user)
        children = with_dead_letter_error(task_children(task=task))
        return Response(TaskListItemSerializer(children, many=True).data)

    @extend_schema(
        summary="The task's checkpoints (its state after each step), in step order",
        parameters=[SeekQuerySerializer],
        responses=CheckpointPageSerializer,
    )
    @action(detail=True, methods=["get"], pagination_class=None)
    def checkpoints(self, request: Request, pk: str) -> Response:
        query = _query(SeekQuerySerializer, request)
        task = task_get(task_id=pk, user=request.user)
        rows = task_checkpoints(task=task, after_step=query.get("after"))
        return seek_page(
            request, rows, key="step", limit=query["limit"], serializer=CheckpointSerializer
        )

    @extend_schema(
        summary="Decide the approval a suspended task waits for: approve, edit, reject, respond",
        request=ApproveSerializer,
        responses={200: TaskSerializer, **errors(409)},
    )
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str) -> Response:
        data = _valid(ApproveSerializer, request.data)
        task = task_approve(task_id=pk, user=request.user, **data)
        return Response(TaskSerializer(task).data)

    @extend_schema(
        summary="Send a named event to a task (kept until the task waits for it)",
        request=SignalSerializer,
        responses={201: SignalOutSerializer, **errors(409)},
    )
    @action(detail=True, methods=["post"])
    def signal(self, request: Request, pk: str) -> Response:
        data = _valid(SignalSerializer, request.data)
        signal = task_signal(task_id=pk, user=request.user, **data)
        return Response(SignalOutSerializer(signal).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Cancel a task that has not ended",
        request=None,
        responses={200: TaskSerializer, **errors(409)},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        return Response(TaskSerializer(task_cancel(task_id=pk, user=request.user)).data)

    @extend_schema(
        summary="Place or release a legal hold (retention never removes a held task)",
        description="Needs the `agents.hold_agenttask` permission; audited as a "
        "`legal_hold` event.",
        request=HoldSerializer,
        responses={200: TaskSerializer, **errors(403)},
    )
    @action(detail=True, methods=["post"])
    def hold(self, request: Request, pk: str) -> Response:
        data = _valid(HoldSerializer, request.data)
        task_get(task_id=pk, user=request.user)  # 404 for a task the user may not see
        task = task_legal_hold_set(task_id=pk, user=request.user, **data)
        return Response(TaskSerializer(task).data)

    @extend_schema(
        summary="Run the task again from one of its checkpoints, as a new task",
        description="The original task is left as it was; the new one links to it and its "
        "audit trail starts with `replayed_from`.",
        request=ReplaySerializer,
        responses={201: TaskSerializer, **errors(503)},
    )
    @action(detail=True, methods=["post"])
    def replay(self, request: Request, pk: str) -> Response:
        data = _valid(ReplaySerializer, request.data)
        task = task_replay(task_id=pk, user=request.user, from_step=data.get("from_step"))
        return Response(TaskSerializer(task).data, status=status.HTTP_201_CREATED)


class DeadLetterViewSet(viewsets.GenericViewSet):
    """Tasks stopped until an operator acts: why, and the way back to work."""

    serializer_class = DeadLetterSerializer
    pagination_class = NewestFirstPagination
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> Any:
        if getattr(self, "swagger_fake_view", False):
            return DeadLetter.objects.none()
        return dead_letters_visible_to(self.request.user)

    @extend_schema(
        summary="Dead letters of your tasks (with view_deadletter: all), newest first",
        parameters=[DeadLetterQuerySerializer],
        responses=DeadLetterSerializer(many=True),
    )
    def list(self, request: Request) -> Response:
        query = _query(DeadLetterQuerySerializer, request)
        letters = dead_letters_visible_to(
            request.user, open=query["open"], task_id=query.get("task")
        )
        page = self.paginate_queryset(letters)
        return self.get_paginated_response(DeadLetterSerializer(page, many=True).data)

    @extend_schema(
        summary="Send the dead-lettered task back to work from its last checkpoint",
        request=None,
        responses={200: TaskSerializer, **errors(409)},
    )
    @action(detail=True, methods=["post"])
    def requeue(self, request: Request, pk: str) -> Response:
        letter = dead_letter_get(dead_letter_id=pk, user=request.user)
        permissions.dead_letter_change_check(request.user, letter)
        task = dead_letter_requeue(dead_letter_id=letter.pk, actor=user_actor(request.user))
        return Response(TaskSerializer(task).data)


@extend_schema(exclude=True)
@api_view(["GET", "POST", "PUT", "PATCH", "DELETE"])
@permission_classes([AllowAny])
def not_found(request: Request, path: str = "") -> Response:
    """Every other ``/api/...`` URL: a JSON 404 like the rest of the API, not a page."""
    hint = ""
    if not path.endswith("/"):
        try:
            if resolve(f"/api/{path}/").url_name != "api-not-found":
                hint = f" (did you mean /api/{path}/ ?)"
        except Resolver404:
            pass
    raise NotFound(f"no API endpoint /api/{path}{hint}")


class BreakerListView(APIView):
    """Every circuit breaker and its state (``tools.view_breaker``: it describes the
    whole system)."""

    permission_classes = [MayViewBreakers]

    @extend_schema(
        summary="Circuit breakers",
        responses={
            200: BreakerSerializer(many=True),
            503: OpenApiResponse(ErrorSerializer, description="Redis is unreachable."),
        },
    )
    def get(self, request: Request) -> Response:
        try:
            breakers = breaker_states()
        except RedisError as exc:
            raise Unavailable(f"circuit breaker state is unavailable: {exc}") from exc
        return Response(BreakerSerializer(breakers, many=True).data)


class TokenRotateView(APIView):
    """Replace the caller's API token: the old one is refused from now on."""

    @extend_schema(
        summary="Rotate your API token (the old one stops working)",
        request=None,
        responses={201: TokenSerializer},
    )
    def post(self, request: Request) -> Response:
        token = api_token_rotate(request.user)
        body = {
            "token": token.key,
            "created": token.created,
            "expires_at": api_token_expires_at(token),
        }
        return Response(TokenSerializer(body).data, status=status.HTTP_201_CREATED)
