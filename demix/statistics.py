"""Statistics the search and the fidelity check share, below both (numpy only).

`pooled_paired_stderr` is the noise both compare differences against: the search's paired
objective (demix.search.objective) and the fidelity check's tie band (demix.fidelity).
"""

from __future__ import annotations

import math

import numpy as np


def pooled_paired_stderr(docs: np.ndarray) -> float:
    """The standard error of a difference between two models' mean scores on the same documents,
    pooled over every pair of the P models: docs [P >= 2 models, N >= 2 documents].

    Each document's mean over the P models is removed, the residuals' variance scaled by
    P / (P - 1) estimates one model's own per-document variance s^2, and sqrt(2 s^2 / N) is the
    standard error of a difference of two models' means. 2 s^2 is exactly the mean over the
    P (P - 1) / 2 pairs of the variance of their per-document differences, so the result is the
    root mean square of the pairs' paired standard errors.
    """
    docs = np.asarray(docs, dtype=np.float64)
    residual = docs - docs.mean(axis=0, keepdims=True)
    # removing the mean of P models leaves (P - 1) / P of each model's own variance
    models = docs.shape[0]
    variance = float(np.mean(np.var(residual, axis=1, ddof=1))) * models / (models - 1)
    return math.sqrt(2.0 * variance / docs.shape[1])
