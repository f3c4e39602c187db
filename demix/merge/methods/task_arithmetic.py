"""Task arithmetic: theta = base + lambda * sum_i w_i (theta_i - base).

Ilharco et al. 2023, "Editing Models with Task Arithmetic" (ICLR 2023, arXiv:2212.04089). Any
finite weights, negative ones included (task negation); `scale` is lambda.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from demix.merge.methods.base import MergeMethod


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Weighted sum of task vectors, scaled by lambda (`scale`)."""

    name: ClassVar[str] = "task_arithmetic"
    citation: ClassVar[str] = (
        "Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089"
    )
    scale: float = 1.0
