"""Model merging: a proxy for a mixture is a weighted merge of component models."""

from demix.merge.delta_stack import DeltaStack, relative_delta_norms
from demix.merge.disk import merge_to_disk
from demix.merge.methods import METHODS, MergeMethod, make_method
from demix.merge.weights import component_mix_matrix, data_to_component

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
