"""The console of a clean run shows no error line it cannot act on: Ray Train's own
PreemptionWatcher line (ray-project/ray#53727) leaves the console, no other line does. End to
end (absent from the console, present in Ray's log files): tests/integration/test_train_job.py."""
import inspect

import pytest
from ray._private import worker as ray_worker
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from rn50.distributed.ray_setup import quiet_ray_own_errors

WATCHER_LINE = ("[2026-12-04 22:31:07,118 E 41873 41906] core_worker.cc:2146: Actor with class "
                "name: 'PreemptionWatcher' and ID: '9a1c5e0b' has constructor arguments in the "
                "object store and max_restarts > 0. If the arguments in the object store go out "
                "of scope or are lost, the actor restart will fail. See "
                "https://github.com/ray-project/ray/issues/53727 for more details.")
USER_ACTOR_LINE = WATCHER_LINE.replace("'PreemptionWatcher'", "'MyCache'")


@pytest.fixture
def printed(monkeypatch):
    """What reaches the console: the dispatcher's printer, as `ray.init` installs it."""
    lines = []
    monkeypatch.setattr(dispatcher, "handlers",
                        [("ray_print_logs", lambda data: lines.extend(data["lines"]))])
    return lines


def test_only_ray_trains_own_error_line_leaves_the_console(printed):
    quiet_ray_own_errors()
    quiet_ray_own_errors()  # init_ray again in the same process: still one printer
    assert [name for name, _ in dispatcher.handlers] == ["ray_print_logs"]
    dispatcher.emit({"lines": [WATCHER_LINE, "epoch 1/8 val_top1=61.2", USER_ACTOR_LINE],
                     "pid": 7, "is_err": True})
    dispatcher.emit({"lines": [WATCHER_LINE], "pid": 7, "is_err": True})
    assert printed == ["epoch 1/8 val_top1=61.2", USER_ACTOR_LINE]


def test_without_a_console_printer_nothing_is_added(printed):
    dispatcher.handlers.clear()  # ray.init(log_to_driver=False)
    quiet_ray_own_errors()
    assert dispatcher.handlers == []


def test_ray_still_prints_worker_logs_the_way_the_filter_assumes():
    """Red after a Ray upgrade that renames the printer or the batch's `lines`."""
    assert '"ray_print_logs",' in inspect.getsource(ray_worker.connect)
    assert 'data.get("lines", [])' in inspect.getsource(ray_worker.print_worker_logs)
