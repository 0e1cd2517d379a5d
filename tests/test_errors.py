"""Every exception the package raises for a user's mistake is a Gpt2labError: one line, no traceback."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import gpt2lab
from gpt2lab.errors import Gpt2labError
from gpt2lab.stage import run


def _package_exceptions() -> dict[str, type[BaseException]]:
    found = {}
    for info in pkgutil.iter_modules(gpt2lab.__path__):
        if info.name == "serving_model":  # MLflow's entry file: importing it registers a model
            continue
        module = importlib.import_module(f"gpt2lab.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_exception_class_is_a_user_error_with_a_standard_base():
    found = _package_exceptions()
    assert len(found) >= 10, sorted(found)  # the scan sees them
    for name, cls in found.items():
        assert issubclass(cls, Gpt2labError), f"{name} is not a Gpt2labError: the CLI would print a traceback"


def test_the_runner_prints_one_line_for_any_of_them(capsys):
    for name, cls in _package_exceptions().items():
        if "__init__" in vars(cls) or any("__init__" in vars(c) for c in cls.__mro__[1:] if c.__module__.startswith("gpt2lab")):
            continue  # built from structured fields (e.g. a missing base checkpoint): tested where raised

        def fail(cls=cls) -> None:
            raise cls("what was wrong; what to do")

        assert run(fail) == 1, name
        err = capsys.readouterr().err
        assert err == "error: what was wrong; what to do\n", name
