"""Package exports imported on first use (PEP 562), so that a light task (a curation group, a
search proposal) does not pay for torch, transformers or lm-eval it never calls: every pipeline
task is a fresh process, and a few seconds of imports each add up over a run's tasks."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The `__getattr__` of `package`: name -> the attribute of the module `exports[name]`."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(module), name)

    return __getattr__
