"""Ray's internal chatter is filtered out of the worker output a quiet job's driver prints, through the handler
Ray's own ray.init installs (a private API: this test fails when its shape changes)."""

import inspect

from ray._private import ray_logging
from ray._private import worker as ray_worker

from orchestration.cluster.job_log import HANDLER, drop_ray_chatter

WATCHER = (
    "[2026-12-06 20:23:02,589 E 15420 15461] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
    "ID: '42bc' has constructor arguments in the object store and max_restarts > 0."
)


def test_ray_init_still_forwards_worker_output_through_the_named_handler():
    assert f'"{HANDLER}"' in inspect.getsource(ray_worker.connect)
    assert callable(ray_logging.global_worker_stdstream_dispatcher.emit)


def test_the_watchers_error_line_is_dropped_and_every_other_line_kept():
    dispatcher = ray_logging.global_worker_stdstream_dispatcher
    printed: list[list[str]] = []
    dispatcher.add_handler(HANDLER, lambda data: printed.append(data["lines"]))
    try:
        assert drop_ray_chatter() is True and drop_ray_chatter() is False  # once
        dispatcher.emit({"lines": [WATCHER, "[stage 1] epoch 1/3 step 4", "RuntimeError: real"], "pid": 1})
        dispatcher.emit({"lines": [WATCHER], "pid": 1})  # nothing left: nothing printed
    finally:
        dispatcher.remove_handler(HANDLER)
    assert printed == [["[stage 1] epoch 1/3 step 4", "RuntimeError: real"]]
