"""Version 2 of the ``deployed`` agent: the same steps, a new state schema (2:
``{"count": int, "trail": [version, ...]}``, migrated from 1), and it does not declare
version 1 compatible, so tasks of version 1 never run on it."""

from __future__ import annotations

from agents.definition import Agent, Continue, Finish, StepContext, Suspend, register


def one_to_two(state):
    return {"count": state["n"], "trail": state["ran"]}


@register
class DeployedV2(Agent):
    name = "deployed"
    version = "2"
    state_version = 2
    migrations = {1: one_to_two}

    def initial_state(self, input):
        return {"count": 0, "trail": []}

    def step(self, ctx: StepContext):
        trail = [*ctx.state["trail"], self.version]
        if ctx.step == 1:
            return Suspend(state={"count": 0, "trail": trail}, event="go")
        if ctx.state["count"] >= 3:
            return Finish(result={"ran": trail})
        return Continue(state={"count": ctx.state["count"] + 1, "trail": trail})
