"""Agents that only the timeout tests need, loaded into their workers with
``AGENTS_MODULES=tests.integration.agents_for_tests``."""

from __future__ import annotations

import time

from celery.exceptions import SoftTimeLimitExceeded

from agents.definition import Agent, Continue, Finish, StepContext, register


@register
class Careful(Agent):
    """On the soft time limit, keeps what it has and moves on."""

    name = "careful"

    def initial_state(self, input):
        return {"done": 0}

    def step(self, ctx: StepContext):
        if ctx.step > 1:
            return Finish(result=ctx.state)
        done = 0
        try:
            for _ in range(100):
                time.sleep(0.1)
                done += 1
        except SoftTimeLimitExceeded:
            return Continue(state={"done": done, "cut_short": True})
        return Continue(state={"done": done, "cut_short": False})


@register
class Stubborn(Agent):
    """Ignores the soft time limit; only the hard limit stops it."""

    name = "stubborn"

    def step(self, ctx: StepContext):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                time.sleep(0.1)
            except SoftTimeLimitExceeded:
                continue
        return Finish(result="never")
