"""Data weights vs component weights.

Component i is trained on general_ratio * general + (1 - general_ratio) * dataset i, so a proxy
with component weights c has seen the data mixture d = M c, column i of M being component i's
training mix. The proxy for a data mixture d therefore merges with c = M^-1 d (least squares when
M is not square). Entries of c may be negative; they always sum to 1 because every column of M
does.
"""

from __future__ import annotations

import numpy as np


def component_mix_matrix(names: list[str], general: np.ndarray, general_ratio: float) -> np.ndarray:
    """M with M[:, i] = training data mix of component i (rows: datasets)."""
    d = len(names)
    general = np.asarray(general, dtype=np.float64)
    return general_ratio * np.outer(general, np.ones(d)) + (1 - general_ratio) * np.eye(d)


def data_to_component(mix_matrix: np.ndarray, data_weights: np.ndarray) -> np.ndarray:
    """c solving M c = d (exact when M is invertible, least squares otherwise)."""
    d = np.asarray(data_weights, dtype=np.float64)
    if mix_matrix.shape[0] == mix_matrix.shape[1]:
        return np.linalg.solve(mix_matrix, d)
    return np.linalg.lstsq(mix_matrix, d, rcond=None)[0]
