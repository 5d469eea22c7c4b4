"""A scripted chat-completions server on loopback, and settings pointing at it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm.testing.chat_server import ChatServer


@pytest.fixture
def chat(settings) -> Iterator[ChatServer]:
    server = ChatServer()
    with server.running():
        settings.LLM = {
            **settings.LLM,
            "BASE_URL": server.url,
            "MODEL": "scripted",
            "API_KEY": "",
            "MODELS": {},
            "OWNER_DAILY_TOKENS": 0,
            "TIMEOUT": 10.0,
        }
        yield server
