"""Issue 22, item 4: the per-process input cache is bounded by the memory it takes."""

from __future__ import annotations

import gc
import json
import tracemalloc

import pytest

from agents.core.engine import _InputCache
from agents.services import task_start

pytestmark = pytest.mark.django_db(transaction=True)

LIMIT = 8 * 1024 * 1024


def test_the_input_cache_holds_at_most_its_limit_in_memory_not_in_text(user, settings):
    settings.AGENTS = {**settings.AGENTS, "INPUT_CACHE_BYTES": LIMIT}
    # ~240 KB of JSON text that decodes into ~1.1 MB of Python objects.
    pad = list(range(100_000, 130_000))
    assert len(json.dumps(pad)) > 230_000
    tasks = [
        task_start(owner=user, agent="scripted", input={"script": [{"final": i}], "pad": pad})[0]
        for i in range(16)
    ]
    cache = _InputCache()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for task in tasks:
            assert cache.get(task.pk)["pad"] == pad
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.size <= LIMIT
    # At most the limit, plus the query machinery's small change; bounded by the texts'
    # length (3.9 MB in all), it held all sixteen decoded inputs, ~17 MB.
    assert held < LIMIT * 1.5, f"the cache holds {held / 2**20:.1f} MiB"


def test_each_caller_gets_its_own_copy_of_the_input(user):
    task = task_start(owner=user, agent="scripted", input={"script": [{"final": 1}]})[0]
    cache = _InputCache()
    cache.get(task.pk)["script"].clear()
    assert cache.get(task.pk)["script"] == [{"final": 1}]
