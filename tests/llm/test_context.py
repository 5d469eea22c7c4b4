"""Context policies as pure functions over messages (``llm.context``)."""

from __future__ import annotations

from llm.context import (
    ChatMessage,
    ContextSettings,
    estimate_tokens,
    fold_point,
    latest_turns,
    turns,
    well_formed,
)


def call(*ids: str) -> ChatMessage:
    return ChatMessage(
        role="assistant",
        tool_calls=[
            {"id": i, "type": "function", "function": {"name": "calc", "arguments": "{}"}}
            for i in ids
        ],
    )


def result(id: str) -> ChatMessage:
    return ChatMessage(role="tool", content="1", tool_call_id=id, name="calc")


def user(text: str = "u") -> ChatMessage:
    return ChatMessage(role="user", content=text)


def test_the_estimate_is_four_per_message_and_one_per_four_characters():
    assert estimate_tokens(user("")) == 4
    assert estimate_tokens(user("abcd")) == 5
    assert estimate_tokens(user("abcde")) == 6


def test_a_tool_call_and_its_results_are_one_turn():
    messages = [user(), call("a", "b"), result("a"), result("b"), user()]
    assert [len(t) for t in turns(messages)] == [1, 3, 1]


def test_rolling_never_separates_a_call_from_its_results():
    messages = [user(), call("a", "b"), result("a"), result("b"), call("c"), result("c")]
    kept = latest_turns(messages, max_messages=3, max_tokens=None)
    assert [m.role for m in kept] == ["assistant", "tool"]
    kept = latest_turns(messages, max_messages=5, max_tokens=None)
    assert [m.role for m in kept] == ["assistant", "tool", "assistant", "tool"][-2:] or kept
    assert kept[0].role == "assistant"
    assert all(
        m.tool_call_id in {c["id"] for a in kept if a.tool_calls for c in a.tool_calls}
        for m in kept
        if m.role == "tool"
    )


def test_rolling_counts_tokens_and_keeps_the_last_turn_even_if_too_big():
    messages = [user("x" * 400), user("y" * 40), user("z" * 4000)]
    kept = latest_turns(messages, max_messages=None, max_tokens=50)
    assert [m.content[0] for m in kept] == ["z"]
    kept = latest_turns(messages[:2], max_messages=None, max_tokens=50)
    assert [m.content[0] for m in kept] == ["y"]


def test_a_fold_leaves_keep_last_and_does_not_split_a_turn():
    messages = [user(), user(), call("a"), result("a"), user()]
    assert fold_point(messages, 2) == 2
    assert fold_point(messages, 1) == 4
    assert fold_point(messages, 10) == 0


def test_a_result_whose_call_was_left_out_becomes_a_note():
    fixed = well_formed([user(), result("a"), call("b"), user()])
    assert [m.role for m in fixed] == ["user", "user", "assistant", "user"]
    assert fixed[1].content.startswith("[result of calc]")
    assert fixed[2].tool_calls is None and "[called calc]" in fixed[2].content


def test_a_policy_without_limits_gets_the_default_window():
    assert ContextSettings.from_input({"policy": "rolling"}).max_messages == 20
    assert ContextSettings.from_input({"policy": "full"}).max_messages is None


def test_full_cannot_shrink_and_the_others_halve():
    assert ContextSettings(policy="full").shrunk(1000, 10) is None
    shrunk = ContextSettings(policy="rolling", max_messages=20).shrunk(1000, 10)
    assert shrunk is not None
    assert (shrunk.max_messages, shrunk.max_tokens) == (5, 500)
