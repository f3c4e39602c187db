"""Models as evaluation loads them: in the evaluation dtype (`evaluate.dtype`; auto: bfloat16 on
CUDA, float32 on CPU), with the model section's loading options (trust_remote_code, attention)."""

from __future__ import annotations

from pathlib import Path

import torch

from demix.config import EvaluateConfig, ModelConfig
from demix.model import load_model, resolve_dtype


def eval_dtype(evaluate: EvaluateConfig, device: torch.device | str) -> torch.dtype:
    """What models are evaluated in, and so the merged proxy's dtype (`evaluate.dtype`; auto:
    bfloat16 on CUDA, float32 on CPU)."""
    return resolve_dtype(evaluate.dtype, torch.device(device))


def load_for_eval(
    evaluate: EvaluateConfig, model: ModelConfig, path: Path, device: torch.device | str
):
    """A model folder loaded for evaluation (evaluate.dtype), with the model section's loading
    options (trust_remote_code, attn_implementation)."""
    return load_model(
        path,
        device,
        eval_dtype(evaluate, device),
        model.trust_remote_code,
        model.attn_implementation,
    )
