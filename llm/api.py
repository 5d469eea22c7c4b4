"""``GET /api/tasks/{id}/messages/``: a task's conversation, in order."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from agents.api.pagination import seek_page
from agents.selectors import task_get
from llm.models import Message
from llm.selectors import task_messages


class MessageSerializer(serializers.ModelSerializer):
    tokens = serializers.SerializerMethodField(
        help_text="Tokens of the model call that produced this message (assistant messages)."
    )
    cost = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = (
            "seq",
            "step",
            "role",
            "content",
            "tool_calls",
            "tool_call_id",
            "name",
            "pinned",
            "tokens",
            "cost",
            "created_at",
        )
        read_only_fields = fields

    def get_tokens(self, message: Message) -> dict[str, int] | None:
        call = message.model_call
        if call is None:
            return None
        return {
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "total_tokens": call.total_tokens,
        }

    def get_cost(self, message: Message) -> float | None:
        return float(message.model_call.cost) if message.model_call is not None else None


class MessageQuerySerializer(serializers.Serializer):
    after = serializers.IntegerField(
        required=False,
        min_value=-1,
        max_value=2**31 - 1,
        help_text="Return the messages after this seq (the previous page's last).",
    )
    limit = serializers.IntegerField(required=False, min_value=1, max_value=1000, default=100)


class MessagePageSerializer(serializers.Serializer):
    results = MessageSerializer(many=True)
    next = serializers.URLField(allow_null=True, help_text="The next page, or null at the end.")


class TaskMessagesView(APIView):
    """The conversation of an LLM task, in order, a page at a time."""

    @extend_schema(
        summary="The task's conversation (role, content, tool calls, tool call id), in order",
        parameters=[MessageQuerySerializer],
        responses=MessagePageSerializer,
        tags=["tasks"],
    )
    def get(self, request: Request, pk: str) -> Response:
        query = MessageQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        task = task_get(task_id=pk, user=request.user)
        rows = task_messages(task_id=task.pk, after_seq=query.validated_data.get("after"))
        return seek_page(
            request,
            rows,
            key="seq",
            limit=query.validated_data["limit"],
            serializer=MessageSerializer,
        )
