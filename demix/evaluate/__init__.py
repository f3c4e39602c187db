"""Evaluation: lm-eval tasks (bundled offline demo tasks or any lm-eval name), held-out loss, the
per-document scores behind each value, and the ranking score built from them.

The names below are imported on first use (demix.lazy): `demix.evaluate.scoring` alone does not
import torch or lm-eval."""

from demix.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "BUNDLED_TASKS": "demix.evaluate.suite",
        "HELDOUT_PREFIX": "demix.evaluate.heldout",
        "PRIMARY_METRICS": "demix.evaluate.harness",
        "Evaluator": "demix.evaluate.harness",
        "check_eval_file": "demix.evaluate.suite",
        "heldout_loss": "demix.evaluate.heldout",
        "oriented": "demix.evaluate.scoring",
        "oriented_values": "demix.evaluate.scoring",
        "per_doc_value": "demix.evaluate.per_doc",
        "percentile_ranks": "demix.evaluate.scoring",
        "score_models": "demix.evaluate.scoring",
    },
)

__all__ = [
    "BUNDLED_TASKS",
    "check_eval_file",
    "Evaluator",
    "heldout_loss",
    "HELDOUT_PREFIX",
    "oriented",
    "oriented_values",
    "per_doc_value",
    "percentile_ranks",
    "PRIMARY_METRICS",
    "score_models",
]
