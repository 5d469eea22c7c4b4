"""A long LLM conversation costs the same to store at every step.

    python benchmarks/llm_conversation.py [--turns 500] [--policy rolling]

Needs PostgreSQL, RabbitMQ and Redis (URLs as in benchmarks/common.py; override with
DATABASE_URL, CELERY_BROKER_URL, REDIS_URL). One ``llm`` task talks to the scripted
chat-completions server on loopback for ``--turns`` model turns; every turn asks for
one ``calc`` call, so the conversation grows by two messages a step (about 1000
messages at the end). The steps run in this process, taken off the real queue one by
one, through the real engine and the real ``openai`` SDK.

For each step it reports:

- bytes written: ``pg_column_size`` of every row the step inserted (its checkpoint, its
  audit events, its messages and its model-call record);
- time: wall-clock from taking the step's message to its commit (agent, model request,
  tool, commit), and the size of the request sent to the model.

and prints the averages over the first and the last 50 turns. With the ``rolling``
policy (the default here) the request has a bounded size too; with ``--policy full`` the
request (and so the model's time) grows with the history while the bytes a step writes
stay flat.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, setup  # noqa: E402

setup(
    AGENTS_QUEUE="llmbench.agents.steps",
    AGENTS_DEAD_LETTER_EXCHANGE="llmbench.agents.dlx",
    AGENTS_DEAD_LETTER_QUEUE="llmbench.agents.dead",
)

from django.conf import settings  # noqa: E402
from django.db import connection  # noqa: E402
from kombu import Connection  # noqa: E402

from agents.core.engine import step_execute  # noqa: E402
from agents.models import AgentTask  # noqa: E402
from agents.services import service_user, task_start  # noqa: E402
from llm.testing.chat_server import ChatServer, estimate  # noqa: E402

ROW_BYTES = """
SELECT
  (SELECT coalesce(sum(pg_column_size(c.*)), 0) FROM agents_checkpoint c
    WHERE c.task_id = %(task)s AND c.step = %(step)s)
+ (SELECT coalesce(sum(pg_column_size(e.*)), 0) FROM audit_auditevent e
    WHERE e.task_id = %(task)s AND e.step = %(step)s)
+ (SELECT coalesce(sum(pg_column_size(m.*)), 0) FROM llm_message m
    WHERE m.task_id = %(task)s AND m.step = %(step)s)
+ (SELECT coalesce(sum(pg_column_size(k.*)), 0) FROM llm_modelcall k
    WHERE k.task_id = %(task)s AND k.step = %(step)s)
"""


def run(turns: int, policy: str) -> list[dict[str, float]]:
    server = ChatServer(
        script=[
            {"tool_calls": [{"name": "calc", "arguments": {"expression": f"{i} * 3 + 1"}}]}
            for i in range(turns - 1)
        ]
        + [{"content": "done"}]
    )
    rows: list[dict[str, float]] = []
    with server.running():
        settings.LLM = {**settings.LLM, "BASE_URL": server.url, "MODEL": "scripted"}
        context: dict[str, object] = {"policy": policy}
        if policy != "full":
            context["max_messages"] = 20
        task, _ = task_start(
            owner=service_user("bench"),
            agent="llm",
            input={
                "system": "You compute. Use calc for every step.",
                "prompt": "Compute 3n + 1 for n = 0, 1, 2, ... one at a time.",
                "tools": ["calc"],
                "max_steps": turns + 1,
                "context": context,
            },
        )
        queue = settings.CELERY_TASK_QUEUES[0]
        with Connection(settings.CELERY_BROKER_URL) as conn:
            bound = queue(conn.default_channel)
            while True:
                message = bound.get(no_ack=False)
                if message is None:
                    if AgentTask.objects.get(pk=task.pk).status != "running":
                        break
                    time.sleep(0.001)
                    continue
                task_id, step = message.payload[0]
                started = time.perf_counter()
                step_execute(task_id=UUID(task_id), step=step)
                elapsed = time.perf_counter() - started
                message.ack()
                with connection.cursor() as cursor:
                    cursor.execute(ROW_BYTES, {"task": task_id, "step": step})
                    written = cursor.fetchone()[0]
                sent = server.received(task=task_id, step=step)
                rows.append(
                    {
                        "step": step,
                        "bytes": written,
                        "ms": elapsed * 1000,
                        "request_tokens": estimate(sent[-1].body) if sent else 0,
                    }
                )
    status = AgentTask.objects.get(pk=task.pk).status
    if status != "completed":
        raise SystemExit(f"the task ended {status}")
    return rows


def summary(rows: list[dict[str, float]], window: int = 50) -> dict[str, dict[str, float]]:
    def avg(part: list[dict[str, float]], key: str) -> float:
        return round(statistics.mean(r[key] for r in part), 1)

    first, last = rows[:window], rows[-window - 1 : -1]  # the last step only finishes
    return {
        name: {
            "bytes_per_step": avg(part, "bytes"),
            "ms_per_step": avg(part, "ms"),
            "request_tokens": avg(part, "request_tokens"),
        }
        for name, part in (("first", first), ("last", last))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--policy", default="rolling", choices=("full", "rolling"))
    parser.add_argument("--json", type=Path, help="also write every step's figures here")
    args = parser.parse_args()
    rows = run(args.turns, args.policy)
    result = summary(rows)
    print(f"{machine()}; {args.turns} turns, policy {args.policy}, {len(rows)} steps")
    for name, figures in result.items():
        print(
            f"  {name} 50 turns: {figures['bytes_per_step']:.0f} bytes written per step, "
            f"{figures['ms_per_step']:.1f} ms per step, request ~{figures['request_tokens']:.0f} "
            "tokens"
        )
    if args.json:
        args.json.write_text(json.dumps({"summary": result, "steps": rows}, indent=1))


if __name__ == "__main__":
    main()
