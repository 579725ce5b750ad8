"""What of Ray's worker output reaches the job log (the driver's stdout/stderr, what `ray job submit` shows).

Ray forwards every worker process's output to the driver. Most of it is the project's own progress lines (rank 0
prints them) and real errors; a few lines are Ray's internal chatter that recurs each stage and reads like a fault:
Ray Train's PreemptionWatcher actor makes Ray's core worker log, at ERROR, that its constructor arguments live in the
object store ("core_worker.cc: Actor with class name: 'PreemptionWatcher' ... max_restarts > 0"). With
train.ray_logs: quiet those lines are dropped on their way to the driver's output (they stay in the workers' own
log files); info shows everything.
"""

from __future__ import annotations

import re

# Ray-internal lines that carry no information for the user of a job, whatever happens in it
RAY_CHATTER = (re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'"),)
HANDLER = "ray_print_logs"  # the name ray.init gives its handler of forwarded worker output


def drop_ray_chatter() -> bool:
    """Filter RAY_CHATTER out of the worker output this driver prints. Call after ray.init; False (nothing changed)
    when this Ray forwards worker output in another way."""
    from ray._private import ray_logging

    dispatcher = getattr(ray_logging, "global_worker_stdstream_dispatcher", None)
    handlers = dict(getattr(dispatcher, "handlers", []))
    original = handlers.get(HANDLER)
    if original is None or getattr(original, "drops_ray_chatter", False):
        return False

    def filtered(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if not any(p.search(line) for p in RAY_CHATTER)]
        if lines:
            original({**data, "lines": lines})

    filtered.drops_ray_chatter = True
    dispatcher.remove_handler(HANDLER)
    dispatcher.add_handler(HANDLER, filtered)
    return True
