"""How many event streams may be open: per user and over the whole deployment.

An open ``GET /api/tasks/{id}/events/`` holds a database connection (and, under WSGI,
would hold a worker: ``agents.events`` serves those without waiting). So each stream
takes a slot before it starts and gives it back when it ends: past
``AGENTS_EVENTS_MAX_STREAMS_PER_USER`` open streams of one user, or
``AGENTS_EVENTS_MAX_STREAMS`` in all, the request is answered 429 with ``Retry-After``
and nothing else is held.

Slots are counted in Redis when ``REDIS_URL`` is set (every web process shares them):
two sorted sets, all streams and the user's, whose members are slot ids scored by the
time their lease ends. A stream renews its lease while it runs (``StreamSlot.renew``);
a process that died without giving its slots back loses them when their lease ends
(``LEASE_SECONDS``). Without Redis, this process counts its own.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import redis
import structlog
from django.conf import settings
from rest_framework.exceptions import Throttled

logger = structlog.get_logger(__name__)

# A slot not renewed for this long is free again (its process is gone).
LEASE_SECONDS = 60.0
RENEW_EVERY = 15.0

# KEYS: all, user. ARGV: now, lease end, slot id, max all, max user.
# Returns 0 (taken), 1 (over the overall limit) or 2 (over the user's).
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if tonumber(ARGV[4]) > 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 1
end
if tonumber(ARGV[5]) > 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
  return 2
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], 3600)
redis.call('EXPIRE', KEYS[2], 3600)
return 0
"""


class TooManyStreams(Throttled):
    default_detail = "Too many open event streams."


@lru_cache(maxsize=4)
def _client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)


_local_lock = threading.Lock()
_local: dict[str, set[str]] = {}


def _keys(user_id: Any) -> tuple[str, str]:
    prefix = f"{settings.REDIS_KEY_PREFIX}:streams"
    return f"{prefix}:all", f"{prefix}:user:{user_id}"


@dataclass
class StreamSlot:
    """One open stream's place in the counts; ``release`` it exactly once."""

    user_id: Any
    slot: str = field(default_factory=lambda: uuid.uuid4().hex)
    renewed: float = field(default_factory=time.monotonic)
    released: bool = False

    def renew(self) -> None:
        """Extend the lease (at most every ``RENEW_EVERY`` seconds; cheap to call)."""
        if self.released or time.monotonic() - self.renewed < RENEW_EVERY:
            return
        self.renewed = time.monotonic()
        if settings.REDIS_URL:
            until = time.time() + LEASE_SECONDS
            try:
                pipe = _client_for(settings.REDIS_URL).pipeline()
                for key in _keys(self.user_id):
                    pipe.zadd(key, {self.slot: until}, xx=True)
                pipe.execute()
            except redis.RedisError as exc:
                logger.warning("stream slot not renewed", error=str(exc))

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if settings.REDIS_URL:
            try:
                pipe = _client_for(settings.REDIS_URL).pipeline()
                for key in _keys(self.user_id):
                    pipe.zrem(key, self.slot)
                pipe.execute()
            except redis.RedisError as exc:  # its lease ends by itself
                logger.warning("stream slot not released", error=str(exc))
            return
        with _local_lock:
            for key in _keys(self.user_id):
                _local.get(key, set()).discard(self.slot)


def stream_slot_acquire(user_id: Any) -> StreamSlot:
    """A slot for one more stream of ``user_id``. Raises ``TooManyStreams`` (429, with
    ``Retry-After``) past either limit (``AGENTS_EVENTS_MAX_STREAMS_PER_USER``,
    ``AGENTS_EVENTS_MAX_STREAMS``; 0: no limit)."""
    conf = settings.AGENTS
    max_all = int(conf.get("EVENTS_MAX_STREAMS", 0))
    max_user = int(conf.get("EVENTS_MAX_STREAMS_PER_USER", 0))
    slot = StreamSlot(user_id=user_id)
    all_key, user_key = _keys(user_id)
    if settings.REDIS_URL:
        now = time.time()
        client = _client_for(settings.REDIS_URL)
        verdict = int(
            client.eval(  # type: ignore[no-untyped-call]
                _ACQUIRE,
                2,
                all_key,
                user_key,
                now,
                now + LEASE_SECONDS,
                slot.slot,
                max_all,
                max_user,
            )
        )
    else:
        with _local_lock:
            everyone, mine = _local.setdefault(all_key, set()), _local.setdefault(user_key, set())
            if max_all and len(everyone) >= max_all:
                verdict = 1
            elif max_user and len(mine) >= max_user:
                verdict = 2
            else:
                verdict = 0
                everyone.add(slot.slot)
                mine.add(slot.slot)
    if verdict == 1:
        raise TooManyStreams(
            detail=f"{max_all} event streams are open on this deployment "
            "(AGENTS_EVENTS_MAX_STREAMS); try again shortly",
            wait=RENEW_EVERY,
        )
    if verdict == 2:
        raise TooManyStreams(
            detail=f"you have {max_user} event streams open (AGENTS_EVENTS_MAX_STREAMS_PER_USER); "
            "close one first",
            wait=RENEW_EVERY,
        )
    return slot


def holding(slot: StreamSlot, stream: Iterator[bytes]) -> Iterator[bytes]:
    """``stream``, renewing ``slot`` as it goes and releasing it when it ends or is closed."""
    try:
        for message in stream:
            slot.renew()
            yield message
    finally:
        slot.release()


async def holding_async(slot: StreamSlot, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The async ``holding``: released also when the client goes away (cancelled)."""
    try:
        async for message in stream:
            slot.renew()
            yield message
    finally:
        slot.release()
