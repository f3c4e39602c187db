"""Model merging: a proxy for a mixture is a weighted merge of component models.

`DeltaStack` and `relative_delta_norms` (torch) are imported on first use, so that the disk
merge of the weighted-sum methods (`merge_to_disk`, numpy) starts without importing torch.
"""

from importlib import import_module

from demix.merge.disk import merge_to_disk
from demix.merge.methods import METHODS, MergeMethod, make_method
from demix.merge.weights import component_mix_matrix, data_to_component

_LAZY = {"DeltaStack": "demix.merge.delta_stack", "relative_delta_norms": "demix.merge.delta_stack"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "DeltaStack",
    "component_mix_matrix",
    "data_to_component",
    "MergeMethod",
    "make_method",
    "merge_to_disk",
    "relative_delta_norms",
]
