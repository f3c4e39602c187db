"""Merge methods behind one registry; each module cites its paper.

| name            | merged delta                                              | weights           |
|-----------------|-----------------------------------------------------------|-------------------|
| linear          | sum_i w_i d_i                                             | sum to 1          |
| task_arithmetic | lambda sum_i w_i d_i                                      | any finite        |
| ties            | lambda disjoint_mean(trim(d_i, density), w)               | non-negative      |
| dare_linear     | lambda sum_i w_i drop(d_i, p) / (1 - p)                   | any finite        |
| dare_ties       | lambda disjoint_sum(drop(d_i, p) / (1 - p), w)            | non-negative      |

with d_i = theta_i - base and theta = base + merged delta. `make_method(name, **parameters)`
builds one; the config's `merge` section names the method and its parameters. torch is imported
inside the functions that compute on tensors: building a method and checking weights do not need
it, nor does the disk merge's weighted sum (numpy).
"""

from __future__ import annotations

from dataclasses import fields

from demix.errors import MixtureError
from demix.merge.methods.base import MergeMethod
from demix.merge.methods.dare import DareLinear, DareTies
from demix.merge.methods.linear import Linear
from demix.merge.methods.task_arithmetic import TaskArithmetic
from demix.merge.methods.ties import Ties
from demix.merge.registry import METHOD_PARAMETERS

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls for cls in (Linear, TaskArithmetic, Ties, DareLinear, DareTies)
}


def method_parameters(name: str) -> tuple[str, ...]:
    """The parameters a method takes (besides the weights)."""
    return tuple(f.name for f in fields(METHODS[name]))


# The registry the config reads is the one source of names and parameters: refuse to load
# methods that disagree with it (a new method or parameter is added to both).
if {name: method_parameters(name) for name in METHODS} != METHOD_PARAMETERS:
    raise ImportError("demix.merge.methods and demix.merge.registry name different parameters")


def make_method(method: str | MergeMethod = "linear", **parameters) -> MergeMethod:
    """A merge method by name with its parameters; MixtureError for unknown names/parameters."""
    if isinstance(method, MergeMethod):
        if parameters:
            raise MixtureError(f"parameters {sorted(parameters)} given with a built method")
        return method
    if method not in METHODS:
        raise MixtureError(f"unknown merge method {method!r}; known: {sorted(METHODS)}")
    unknown = sorted(set(parameters) - set(method_parameters(method)))
    if unknown:
        raise MixtureError(
            f"merge method {method!r} takes {list(method_parameters(method))}, not {unknown}"
        )
    return METHODS[method](**parameters)


__all__ = ["METHODS", "MergeMethod", "make_method", "method_parameters"]
