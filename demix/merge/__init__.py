"""Model merging: a proxy for a mixture is a weighted merge of component models.

The names below are imported on first use (demix.lazy): the disk merge of the weighted-sum
methods (`merge_to_disk`, numpy) starts without importing torch (`DeltaStack`,
`relative_delta_norms`)."""

from demix.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "METHODS": "demix.merge.methods",
        "DeltaStack": "demix.merge.delta_stack",
        "MergeMethod": "demix.merge.methods",
        "make_method": "demix.merge.methods",
        "merge_to_disk": "demix.merge.disk",
        "record_relative_delta_norm": "demix.merge.delta_stack",
        "relative_delta_norms": "demix.merge.delta_stack",
    },
)

__all__ = [
    "DeltaStack",
    "make_method",
    "merge_to_disk",
    "MergeMethod",
    "METHODS",
    "record_relative_delta_norm",
    "relative_delta_norms",
]
