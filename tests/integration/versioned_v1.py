"""Version 1 of the ``deployed`` agent, for the rolling-deploy test (loaded into its
workers with ``AGENTS_MODULES=tests.integration.versioned_v1``).

Step 1 waits for the event ``go``; then three steps each record, in the state, the
version of the code that ran them; the result is that record. State schema 1:
``{"n": int, "ran": [version, ...]}``."""

from __future__ import annotations

from agents.definition import Agent, Continue, Finish, StepContext, Suspend, register


@register
class DeployedV1(Agent):
    name = "deployed"
    version = "1"
    state_version = 1

    def initial_state(self, input):
        return {"n": 0, "ran": []}

    def step(self, ctx: StepContext):
        ran = [*ctx.state["ran"], self.version]
        if ctx.step == 1:
            return Suspend(state={"n": 0, "ran": ran}, event="go")
        if ctx.state["n"] >= 3:
            return Finish(result={"ran": ran})
        return Continue(state={"n": ctx.state["n"] + 1, "ran": ran})
