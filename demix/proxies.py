"""Proxies: what scoring a candidate mixture during the search is made of.

The merge method and the merge settings the scores depend on, where the search's base and
deltas live (the merge memory plan), the evaluator over the configured tasks, and `score_key`:
the fingerprint of everything a proxy's scores depend on besides the mixture, stamped on every
scores row so a resumed search never mixes scores of different setups. Each takes the config
sections it reads; the proxy evaluators that put them together over a run are stages
(demix.stages.proxies).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from demix.checkpoint import read_model_manifest
from demix.config import EvaluateConfig, MergeConfig
from demix.data.shards import CuratedData
from demix.evaluate import Evaluator
from demix.evaluate.models import eval_dtype
from demix.merge import MergeMethod, make_method
from demix.merge.plan import MemoryPlan, plan_for
from demix.storage import fetch_files, read_manifest
from demix.train import fingerprint

log = logging.getLogger(__name__)

# The method assumes components stay close to the base (the paper: about 0.1 or less).
SMALL_UPDATE = 0.1


def large_updates(norms: dict[str, float]) -> dict[str, float]:
    """The components whose ||theta_i - base|| / ||base|| exceeds SMALL_UPDATE (rounded)."""
    return {n: round(v, 4) for n, v in norms.items() if v > SMALL_UPDATE}


def warn_large_updates(norms: dict[str, float]) -> dict[str, float]:
    """Log one warning when components moved far from the base; return those components."""
    large = large_updates(norms)
    if large:
        log.warning(
            "components moved far from the base (||delta||/||base|| > %s): %s; merged proxies "
            "assume small updates and may not track trained models (lower the component lr or "
            "budget)",
            SMALL_UPDATE,
            large,
        )
    return large


def merge_method(merge: MergeConfig) -> MergeMethod:
    """The configured merge method with its parameters."""
    return make_method(merge.method, **merge.parameters)


def make_evaluator(evaluate: EvaluateConfig, data: CuratedData, device: torch.device) -> Evaluator:
    """Evaluator over the configured tasks, built once."""
    data_dir = fetch_files(evaluate.data_dir) if evaluate.data_dir else None
    return Evaluator(
        evaluate, data.load_tokenizer(), str(device), data=data, eval_data_dir=data_dir
    )


def model_id(folder: Path) -> str:
    """A model folder's training fingerprint (its path when it has none)."""
    return read_model_manifest(folder).get("fingerprint") or str(folder)


def merge_settings(merge: MergeConfig) -> dict:
    """The merge settings a merged proxy's scores depend on (not how merged models are saved,
    nor where the deltas live: host and device builds give the same proxies up to rounding)."""
    return merge.model_dump(exclude={"output_dtype", "shard_bytes", "delta_device"})


def merge_memory_plan(
    merge: MergeConfig, evaluate: EvaluateConfig, base: Path, k: int, device: torch.device
) -> MemoryPlan:
    """Where the search's base and `k` deltas will live (merge.delta_device), for a proxy in the
    evaluation dtype (evaluate.dtype), logged in one line.

    Reads only the base's safetensors headers; raises ModelError, naming what would fit, when
    nothing does.
    """
    plan = plan_for(
        base,
        k,
        merge_method(merge),
        eval_dtype(evaluate, device),
        merge.delta_dtype,
        device,
        merge.delta_device,
    )
    log.info("%s", plan.line)
    return plan


def score_key(
    evaluate: EvaluateConfig, data: CuratedData, base: Path, *, device: torch.device | str, **what
) -> str:
    """Fingerprint of everything a proxy's scores depend on besides its mixture.

    Stamped on every scores row; a resumed search refuses rows stamped differently (changed
    tasks, limits, merge settings or models) instead of mixing them. Settings that do not change
    scores (evaluation engine, batch size) are left out; the evaluation dtype as resolved on the
    run's `device` is in, when it is not float32 (float32 keys are those of before the setting).
    """
    dtype = eval_dtype(evaluate, device)
    if dtype != torch.float32:
        what = {**what, "eval_dtype": str(dtype).removeprefix("torch.")}
    # diagnostics count only when set: keys of runs from before the setting stay valid
    unset = set() if evaluate.diagnostics else {"diagnostics"}
    return fingerprint(
        evaluate=evaluate.model_dump(exclude={"engine", "batch_size", "dtype", *unset}),
        data=read_manifest(data.root).get("files"),
        base=model_id(base),
        **what,
    )
