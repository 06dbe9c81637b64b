"""Ray's exception classes that rn50 translates (rn50/distributed/ray_errors.py) are still where
the adapter imports them from, still exceptions, and still raised by Ray Train: red after a Ray
upgrade that renames, moves or stops raising one, before a cluster run finds out. The
translation itself: tests/unit/test_capacity.py."""
import importlib
import inspect
import re
from pathlib import Path

import pytest
import ray

from rn50.distributed import ray_errors
from rn50.distributed.fit_ladder import Outcome

TRAIN_V2 = Path(ray.__file__).parent / "train" / "v2"
NAMES = [(module, name) for module, names in ray_errors.RAY_EXCEPTIONS.items() for name in names]


def _raised_in_ray(cls: type) -> bool:
    """Whether Ray Train's own code (not its tests) builds `cls` or a subclass of it."""
    names = {cls.__name__} | {sub.__name__ for sub in _subclasses(cls)}
    pattern = re.compile(r"\b(" + "|".join(names) + r")\(")
    for path in TRAIN_V2.rglob("*.py"):
        if "tests" in path.parts:
            continue
        if any(not line.lstrip().startswith("class ") and pattern.search(line)
               for line in path.read_text().splitlines()):
            return True
    return False


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


@pytest.mark.parametrize("module, name", NAMES)
def test_the_adapters_ray_exceptions_are_where_it_imports_them_and_still_raised(module, name):
    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(ray_errors, name), f"ray_errors.{name} is not {module}.{name}"
    assert inspect.isclass(cls) and issubclass(cls, BaseException), f"{module}.{name}"
    if module != "ray.exceptions":  # Ray core's are raised from its Cython core, not Python
        assert _raised_in_ray(cls), f"Ray Train no longer raises {module}.{name}"


def test_every_ray_exception_the_module_uses_is_listed():
    """A Ray exception imported into ray_errors but missing from RAY_EXCEPTIONS would escape
    the check above."""
    used = {name for name, value in vars(ray_errors).items() if inspect.isclass(value)
            and issubclass(value, BaseException) and value.__module__.startswith("ray.")}
    assert used == {name for _, name in NAMES}


def test_fit_errors_translate_into_the_projects_outcomes():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError
    assert ray_errors.classify(ControllerError(ray_errors.StartGaveUp("no room"))).kind is \
        Outcome.NO_RESOURCES
    assert ray_errors.classify(ControllerError(
        ray_errors.InsufficientClusterResourcesError("too big\ndetails"))) == \
        ray_errors.Failure(Outcome.NO_RESOURCES, "too big", 4)
    assert ray_errors.classify(ControllerError(RuntimeError("storage down"))) == \
        ray_errors.Failure(Outcome.CONTROLLER, "storage down")
    assert ray_errors.classify(WorkerGroupError("died", {0: RuntimeError("oom")})).kind is \
        Outcome.WORKERS
