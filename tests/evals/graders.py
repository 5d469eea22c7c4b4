"""A custom grader for the tests (``expect.python``)."""

from typing import Any

from evals.graders import Run


def steps_at_most(run: Run, limit: Any) -> tuple[float, str]:
    return (1.0 if run.steps <= limit else 0.0), f"{run.steps} steps"
