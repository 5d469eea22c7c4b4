"""Issue 22, item 8: the DLQ holds exactly the letters still open (real RabbitMQ)."""

from __future__ import annotations

import pytest
from django.conf import settings

from agents.core.dead_letters import dead_letter_queue_reconcile, dead_letter_requeue
from agents.models import AgentTask, TaskStatus
from agents.services import task_start
from agents_project.topology import dead_letter_queue
from audit.models import DeadLetter
from tests.helpers import broker, queue_depth, run_until_idle, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

DLQ = dead_letter_queue(settings.AGENTS)


def test_a_step_dead_lettered_and_requeued_three_times_leaves_one_message_each_round(
    user, settings
):
    settings.AGENTS = {**settings.AGENTS, "MAX_RETRIES": 0}
    task = task_start(owner=user, agent="scripted", input={"script": [{"fail": "no"}]})[0]
    for _ in range(3):
        run_until_idle()
        assert AgentTask.objects.get(pk=task.pk).status == TaskStatus.DEAD_LETTERED
        letter = DeadLetter.objects.get(task=task, requeued_at__isnull=True)
        wait_until(lambda: queue_depth(DLQ) == 1)
        dead_letter_queue_reconcile(actor="scheduler:test")
        assert queue_depth(DLQ) == 1, "an open letter keeps its message"
        dead_letter_requeue(dead_letter_id=letter.pk, actor="user:operator")
        wait_until(lambda: queue_depth(DLQ) == 0)  # the requeue took the old message out
    assert DeadLetter.objects.filter(task=task).count() == 3


def test_open_letters_keep_one_message_each_and_the_rest_is_removed(user, settings):
    settings.AGENTS = {**settings.AGENTS, "MAX_RETRIES": 0}
    tasks = [
        task_start(owner=user, agent="scripted", input={"script": [{"fail": "no"}]})[0]
        for _ in range(3)
    ]
    run_until_idle()
    wait_until(lambda: queue_depth(DLQ) == 3)
    # A copy of one message (an at-least-once dead-lettering can deliver twice).
    with broker() as conn:
        queue = DLQ(conn.default_channel)
        message = queue.get(no_ack=False)
        producer = conn.Producer()
        producer.publish(
            message.body,
            routing_key=DLQ.name,
            headers=message.headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )
        message.requeue()
    wait_until(lambda: queue_depth(DLQ) == 4)
    letter = DeadLetter.objects.get(task=tasks[0])
    dead_letter_requeue(dead_letter_id=letter.pk, actor="user:operator")
    wait_until(lambda: queue_depth(DLQ) == 2)  # one message per letter still open
    run_until_idle()  # the requeued task fails again: a new open letter, a new message
    wait_until(lambda: queue_depth(DLQ) == 3)
    assert dead_letter_queue_reconcile(actor="scheduler:test") == 0
    assert queue_depth(DLQ) == 3
