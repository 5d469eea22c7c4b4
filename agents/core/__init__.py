"""The durable-execution core: how one step of one task runs once, and only once.

The flow is one way; a module imports only those below it::

    agents.tasks.run_step              the Celery task: translate the message, call
         |                             the engine, map its answer to ack/reject/requeue
         v
    engine.step_execute                claim, run the agent and its tools, check, commit
         |
         +--> leases                   claim (fenced compare-and-swap), heartbeat,
         |                             deadline alarm, hand-back on shutdown
         +--> retries                  retry later, fail, refuse, dead-letter (fenced)
         +--> agents.scheduling        suspend / resume / approve / cancel / time out
         +--> dispatch                 publish a step inside the transaction that makes
         |                             it runnable (no task or engine import); or, for
         |                             an in-process runner, collect it (evals)
         v
    clock                              the database's clock, for every comparison
    agents.models, audit               the store

    scheduler.Scheduler                the clock thread of every worker: retries,
         |                             timers, deadlines, the sweep, admissions,
         |                             DLQ reconciling
         +--> admission                fair sharing: per-owner limits, round-robin
         |                             admission (also used by agents.services)
         +--> dead_letters             DLQ inbox -> DeadLetter rows; requeue
         +--> versions                 announce the agent versions this worker serves
         +--> dispatch, agents.scheduling

    versions                           version-pinned runs: intake (newest served
                                       version, ramp, holds), worker announcements;
                                       the engine refuses a step of another version
                                       (``Agent.runs_version``) and the sweep selects
                                       only versions it serves; imports clock,
                                       agents.definition and the store
                                       (rollout.models) only

``faults`` holds the crash points the fault tests use; ``results`` the engine's answer.
"""
