"""Token and cost budgets: checked before a model call is made, never after.

A task's ``budget`` (``tokens``, ``cost``, ``model_calls``) bounds what its model calls
add up to; ``AGENTS_LLM_OWNER_DAILY_TOKENS`` bounds the tokens of all of one owner's
tasks per UTC day. Spent amounts are the providers' reported usage (an estimate only
when a server reports none); the call about to be made counts with its estimated prompt
tokens (``llm.context.estimate_tokens``), since its completion is not known yet.

When the next call would pass a budget, the task ends ``failed`` with the error code
``budget_exceeded`` (``on_budget: fail``, the default), or suspends for a person's
approval (``on_budget: approval``). Approving a task budget grants, for each limit the budget
has, the larger of the budget's own size and what the call asked about needs beyond
the limit so far (``budget_grant``), so an approval always lets that call go out; the
question says how much it grants. Approving the daily budget lets this task go on past
it for the rest of the UTC day. Rejecting ends the task ``failed`` with
``budget_exceeded``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings

from llm.selectors import owner_tokens_today

ERROR_CODE = "budget_exceeded"


@dataclass(frozen=True)
class Budget:
    tokens: int | None = None
    cost: Decimal | None = None
    model_calls: int | None = None

    @classmethod
    def from_input(cls, data: dict[str, Any] | None) -> Budget:
        data = data or {}
        cost = data.get("cost")
        return cls(
            tokens=data.get("tokens"),
            cost=Decimal(str(cost)) if cost is not None else None,
            model_calls=data.get("model_calls"),
        )

    def times(self, n: int) -> Budget:
        return Budget(
            tokens=self.tokens * n if self.tokens is not None else None,
            cost=self.cost * n if self.cost is not None else None,
            model_calls=self.model_calls * n if self.model_calls is not None else None,
        )

    def plus(self, other: Budget) -> Budget:
        """This budget with ``other`` added to each limit it has (None stays None)."""
        return Budget(
            tokens=None if self.tokens is None else self.tokens + (other.tokens or 0),
            cost=None if self.cost is None else self.cost + (other.cost or Decimal(0)),
            model_calls=(
                None if self.model_calls is None else self.model_calls + (other.model_calls or 0)
            ),
        )

    def as_state(self) -> dict[str, Any]:
        """As JSON for a checkpoint's state (``from_input`` reads it back)."""
        return {
            "tokens": self.tokens,
            "cost": str(self.cost) if self.cost is not None else None,
            "model_calls": self.model_calls,
        }

    def describe(self) -> str:
        """``"520 more tokens, 1 more model call and 0.00052 more in cost"`` (the limits
        it has), as a grant reads in an approval question."""
        parts = []
        if self.tokens is not None:
            parts.append(f"{self.tokens} more tokens")
        if self.model_calls is not None:
            plural = "" if self.model_calls == 1 else "s"
            parts.append(f"{self.model_calls} more model call{plural}")
        if self.cost is not None:
            parts.append(f"{self.cost.normalize():f} more in cost")
        if len(parts) < 2:
            return "".join(parts) or "nothing"
        return f"{', '.join(parts[:-1])} and {parts[-1]}"


def budget_grant(
    *,
    budget: Budget,
    limit: Budget,
    usage: dict[str, Any],
    calls: int,
    tokens: int,
    cost: Decimal,
) -> Budget:
    """What approving a task over ``limit`` (its ``budget`` plus earlier grants) adds:
    for each limit, the larger of ``budget``'s own size and what ``usage`` plus the
    next ``calls`` calls of about ``tokens`` tokens and ``cost`` need beyond ``limit``.
    With it added, ``budget_check`` of those same calls passes."""

    def more(size: Any, current: Any, needed: Any) -> Any:
        if size is None or current is None:
            return None
        return max(size, needed - current)

    return Budget(
        tokens=more(budget.tokens, limit.tokens, usage["total_tokens"] + tokens),
        cost=more(budget.cost, limit.cost, Decimal(usage["cost"]) + cost),
        model_calls=more(budget.model_calls, limit.model_calls, usage["model_calls"] + calls),
    )


def usage_empty() -> dict[str, Any]:
    return {
        "model_calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "cost": "0",
    }


def usage_add(
    usage: dict[str, Any], *, prompt: int, completion: int, total: int, cost: Decimal
) -> dict[str, Any]:
    """``usage`` (a state's running totals) plus one call."""
    return {
        "model_calls": usage["model_calls"] + 1,
        "prompt_tokens": usage["prompt_tokens"] + prompt,
        "completion_tokens": usage["completion_tokens"] + completion,
        "total_tokens": usage["total_tokens"] + total,
        "cost": str(Decimal(usage["cost"]) + cost),
    }


def budget_check(
    *, budget: Budget, usage: dict[str, Any], calls: int, tokens: int, cost: Decimal
) -> str | None:
    """Why ``calls`` more calls of about ``tokens`` tokens costing about ``cost`` would
    pass ``budget`` given ``usage`` so far; None if they fit."""
    if budget.model_calls is not None and usage["model_calls"] + calls > budget.model_calls:
        return f"{usage['model_calls']} model calls made, the budget allows {budget.model_calls}"
    if budget.tokens is not None and usage["total_tokens"] + tokens > budget.tokens:
        return (
            f"{usage['total_tokens']} tokens used and about {tokens} more needed, the "
            f"budget is {budget.tokens}"
        )
    spent = Decimal(usage["cost"])
    if budget.cost is not None and spent + cost > budget.cost:
        return (
            f"cost {spent:.6f} spent and about {cost:.6f} more needed, the budget is {budget.cost}"
        )
    return None


def owner_daily_check(*, owner_id: int, tokens: int) -> str | None:
    """Why ``tokens`` more would pass the owner's daily token budget; None if they fit."""
    limit = settings.LLM["OWNER_DAILY_TOKENS"]
    if not limit:
        return None
    used = owner_tokens_today(owner_id=owner_id)
    if used + tokens > limit:
        return (
            f"the owner's tasks used {used} tokens today and about {tokens} more are needed; "
            f"the daily budget is {limit}"
        )
    return None
