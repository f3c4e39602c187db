"""Evaluation: lm-eval tasks (bundled offline demo tasks or any lm-eval name), held-out loss, the
per-document scores behind each value, and the ranking score built from them."""

from demix.evaluate.harness import PRIMARY_METRICS, Evaluator
from demix.evaluate.heldout import HELDOUT_PREFIX, heldout_loss
from demix.evaluate.per_doc import per_doc_value
from demix.evaluate.scoring import oriented, oriented_values, percentile_ranks, score_models
from demix.evaluate.suite import BUNDLED_TASKS, check_eval_file

__all__ = [
    "BUNDLED_TASKS",
    "HELDOUT_PREFIX",
    "PRIMARY_METRICS",
    "Evaluator",
    "check_eval_file",
    "heldout_loss",
    "oriented",
    "oriented_values",
    "per_doc_value",
    "percentile_ranks",
    "score_models",
]
