"""The merge methods' names and the parameters each takes, below both the config and the methods.

The config checks `merge.method` and its parameters against this table without importing the
methods (torch-free, and no arrow from the config up into demix.merge); demix.merge.methods
refuses to load when its classes' fields differ from it, so the two cannot drift apart.
"""

from __future__ import annotations

# name -> the parameters the method takes besides the weights, in its dataclass's field order
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "task_arithmetic": ("scale",),
    "ties": ("scale", "density"),
    "dare_linear": ("scale", "drop_rate", "seed"),
    "dare_ties": ("scale", "drop_rate", "seed"),
}
