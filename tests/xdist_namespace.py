"""Keep pytest-xdist's worker processes apart: loaded with ``-p`` (pyproject's addopts),
so it runs before pytest-django reads the settings.

Each xdist worker (``PYTEST_XDIST_WORKER``: gw0, gw1, ...) gets its own queues, Redis
key prefix and var folder by a suffix on the namespace ``bin/test`` set; pytest-django
already gives each its own test database. The Celery workers a test starts inherit
this environment, so they serve the same worker's queues.
"""

from __future__ import annotations

import os

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER and not os.environ.get("AGENTS_XDIST_NAMESPACED"):
    os.environ["AGENTS_XDIST_NAMESPACED"] = _WORKER
    for name in ("AGENTS_QUEUE", "AGENTS_DEAD_LETTER_EXCHANGE", "AGENTS_DEAD_LETTER_QUEUE"):
        if name in os.environ:
            os.environ[name] = f"{os.environ[name]}.{_WORKER}"
    os.environ["AGENTS_REDIS_KEY_PREFIX"] = (
        f"{os.environ.get('AGENTS_REDIS_KEY_PREFIX', 'agents')}.{_WORKER}"
    )
    if "AGENTS_VAR_DIR" in os.environ:
        os.environ["AGENTS_VAR_DIR"] = os.path.join(os.environ["AGENTS_VAR_DIR"], _WORKER)
