"""The durable-execution core: how one step of one task runs once, and only once.

The flow is one way; a module imports only those below it (import-linter checks it,
``bin/lint``; the contract is in ``pyproject.toml``)::

    scheduler          the clock thread of every worker (``agents.worker`` starts it):
                       retry timers, wake-ups, wait timeouts, deadlines, the stuck-task
                       sweep and the takeover of vanished holders and lost messages,
                       admissions, DLQ reconciling, version announcements, and the
                       jobs its worker gives it (firing schedules: ``agents.schedules``)
    engine             run a delivery: claim the lease, run the agent and its tools
                       (heartbeat, deadline alarm), check the outcome, hand it to commit
    commit             write a delivery's steps in one fenced transaction and publish
                       the next step before it commits (the hot path's one statement,
                       or the general path through the state machine)
    dead_letters       DLQ inbox -> DeadLetter rows; requeue
    children           child tasks: started in a step's commit, the parent suspended
                       on a join that each child's ending checks; cancel cascade
    admission          fair sharing: per-owner limits, round-robin admission
    retries            retry later, fail, refuse, dead-letter (all fenced)
    suspensions        suspend and resume: approvals, signals, timers, wait timeouts,
                       cancel, time out
    versions           version-pinned runs: intake (newest served version, ramp, holds)
                       and worker announcements
    intake             a new task's rows (task, checkpoint 0, ``created``), many at once
    handoffs           a step hands its wait (a model call) to another process and
                       frees its pool process: the hand-off queue and its lease
    leases             the lease: claim (fenced compare-and-swap), heartbeat, deadline
                       alarm, hand-back on shutdown
    dispatch           publish a step inside the transaction that makes it runnable
                       (no task or engine import); or, for an in-process runner,
                       collect it (evals)
    state_machine      the one table of statuses, the only writer of ``status`` (and the
                       hook every ending runs: the join of a child's parent)
    clock              the database's clock, for every comparison
    faults, results    crash points for the fault tests; the engine's answer

Below the core: the store and the agent API (``agents.models``, ``agents.definition``,
``agents.errors``, ``agents.selectors``, ``agents.permissions``, ``agents.metrics``),
the tools (``tools.runner``), the audit trail (``audit``). Above it: the Celery task
(``agents.tasks.run_step``), the services, the API, the admin and the commands.
"""
