"""Per-document scores: what a paired comparison of two models resamples.

Every task result carries `per_doc`, one float per document in the task's document order: lm-eval's
doc_id order (the first `limit` documents), a group's tasks one after another in the order lm-eval
loads them, held-out windows in stream order. The order depends on the task only, never on the
model or the engine (fast and lm-eval give the same array), so two models' arrays pair element by
element. What an element is, by the aggregation of the task's reported metric:

- mean (acc, acc_norm: 0 or 1 per question; exact_match; any mean-aggregated metric): the
  document's metric. `value == mean(per_doc)`.
- bits_per_byte (the bundled *_bpb tasks, loglikelihood_rolling tasks): the document's bits per
  byte, -loglikelihood / bytes / ln 2, with `doc_weight` its bytes, so that
  `value == sum(doc_weight * per_doc) / sum(doc_weight)` (lm-eval's bits per byte is the ratio of
  the sums, not the mean of the ratios).
- held-out loss (`heldout:<dataset>`): each window's mean token loss in nats, with `doc_weight` its
  scored tokens (the last window is shorter); the same weighted mean.
- perplexity, weighted_perplexity (perplexity, word_perplexity, byte_perplexity): the document's
  perplexity, with `doc_weight` its words or bytes for the weighted kind, and
  `per_doc_mean: "geometric"`: `value == exp(sum(w * log(per_doc)) / sum(w))`.
- a group: its tasks' documents concatenated; `doc_weight` scales each task's documents so that the
  weighted mean is lm-eval's group aggregate (weighted by task size or not).

`doc_weight` is present only where documents weigh differently (absent: all weigh the same).
Any other aggregation (corpus-level metrics such as f1, bleu, matthews_corrcoef; median; a
task's own function) and groups of perplexities have no per-document score that gives back the
value: their `per_doc` is None. `per_doc_value` recomputes a task's value from these
fields, over all documents or over any resample of them (a bootstrap).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from demix.errors import TaskError

# The aggregation of a metric, from lm-eval's registered aggregation functions.
MEAN = "mean"
BITS_PER_BYTE = "bits_per_byte"
PERPLEXITY = "perplexity"
WEIGHTED_PERPLEXITY = "weighted_perplexity"
GEOMETRIC = "geometric"


def per_doc_value(result: dict[str, Any], index: Any = None) -> float:
    """A task's value recomputed from its per_doc (and doc_weight), over documents `index`
    (indices or a mask into per_doc; all documents by default).

    Raises TaskError for a result without per-document scores.
    """
    if result.get("per_doc") is None:
        raise TaskError(
            f"a {result.get('metric')!r} result has no per-document scores (a corpus-level "
            f"metric); compare such tasks by their value only"
        )
    scores = np.asarray(result["per_doc"], dtype=np.float64)
    weights = (
        np.asarray(result["doc_weight"], dtype=np.float64)
        if result.get("doc_weight") is not None
        else np.ones_like(scores)
    )
    if index is not None:
        scores, weights = scores[index], weights[index]
    if result.get("per_doc_mean") == GEOMETRIC:
        return float(np.exp(np.sum(weights * np.log(scores)) / np.sum(weights)))
    return float(np.sum(weights * scores) / np.sum(weights))


def heldout_per_doc(sums: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Per-window mean losses of a held-out task, weighted by their scored tokens."""
    return _fields((sums / counts).tolist(), counts.tolist(), arithmetic=True)


def lm_eval_per_doc(
    raw: dict[str, Any],
    name: str,
    leaves: list[str],
    metric: str,
    filter_key: str,
    tasks: dict[str, Any],
    group: Any = None,
) -> dict[str, Any]:
    """{"per_doc", and "doc_weight" / "per_doc_mean" where they apply} of one lm-eval task or group
    from the per-document samples in lm-eval's output `raw` (either engine's).

    `metric` and `filter_key` are those of the reported value, `tasks` the loaded lm-eval tasks
    by leaf name, `group` the lm-eval Group when `name` is one.
    """
    per_leaf = []
    for leaf in leaves:
        samples = [
            s
            for s in raw.get("samples", {}).get(leaf, [])
            if s.get("filter") == filter_key and metric in s
        ]
        if not samples:
            continue  # as lm-eval's group aggregate skips a task without the metric
        kind = _aggregation(tasks[leaf], metric)
        if kind is None:
            return {"per_doc": None}
        samples.sort(key=lambda s: s["doc_id"])
        scored = _leaf_scores([s[metric] for s in samples], kind)
        if scored is None:
            return {"per_doc": None}
        per_leaf.append((kind, *scored))
    if not per_leaf:
        return {"per_doc": None}
    geometric = {kind for kind, _, _ in per_leaf} & {PERPLEXITY, WEIGHTED_PERPLEXITY}
    if group is None and len(per_leaf) == 1:
        _, scores, weights = per_leaf[0]
        return _fields(scores, weights, arithmetic=not geometric)
    weight_by_size = _group_weights_by_size(group, metric)
    if geometric or weight_by_size is None:
        return {"per_doc": None}  # lm-eval's group value is an arithmetic mean of task values
    scores, weights = [], []
    for _, leaf_scores, leaf_weights in per_leaf:
        size = len(leaf_scores)
        leaf_weights = leaf_weights or [1.0] * size
        # Each task's documents sum to its size (or 1), as lm-eval weighs the task values.
        scale = (size if weight_by_size else 1.0) / math.fsum(leaf_weights)
        scores.extend(leaf_scores)
        weights.extend(w * scale for w in leaf_weights)
    return _fields(scores, weights, arithmetic=True)


def _fields(scores: list[float], weights: list[Any] | None, arithmetic: bool) -> dict[str, Any]:
    """The result fields; doc_weight only where documents weigh differently."""
    fields: dict[str, Any] = {"per_doc": scores}
    if weights is not None and len(set(weights)) > 1:
        fields["doc_weight"] = weights
    if not arithmetic:
        fields["per_doc_mean"] = GEOMETRIC
    return fields


def _aggregation(task: Any, metric: str) -> str | None:
    """Which of MEAN, BITS_PER_BYTE, PERPLEXITY, WEIGHTED_PERPLEXITY aggregates `metric` of
    `task` (None for any other aggregation)."""
    from lm_eval.api import metrics

    function = task.aggregation().get(metric)
    known = {
        metrics.mean: MEAN,
        metrics.bits_per_byte: BITS_PER_BYTE,
        metrics.perplexity: PERPLEXITY,
        metrics.weighted_perplexity: WEIGHTED_PERPLEXITY,
    }
    return known.get(function)


def _leaf_scores(values: list[Any], kind: str) -> tuple[list[float], list[Any] | None] | None:
    """(per-document scores, weights or None) of one task's sample values; None if malformed."""
    try:
        if kind == MEAN:
            return [float(v) for v in values], None
        if kind == PERPLEXITY:
            return [float(np.exp(-float(v))) for v in values], None
        pairs = [(float(ll), n) for ll, n in values]
    except (TypeError, ValueError):
        return None
    if kind == BITS_PER_BYTE:
        return [-ll / n / math.log(2) for ll, n in pairs], [n for _, n in pairs]
    return [float(np.exp(-ll / n)) for ll, n in pairs], [n for _, n in pairs]


def _group_weights_by_size(group: Any, metric: str) -> bool | None:
    """Whether `group` weighs its tasks' values of `metric` by their size (None: no aggregate)."""
    for config in getattr(group, "aggregate_metric_list", None) or []:
        if config.metric == metric and config.aggregation in (MEAN, None):
            return bool(config.weight_by_size)
    return None
