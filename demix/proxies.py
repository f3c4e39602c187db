"""Proxies: how a candidate mixture is scored during the search.

`ProxyEvaluator` (DeMix) loads the base and the components once and builds each proxy in place
by weighted merging; `TrainedProxyEvaluator` (the training-based baseline) trains a model per
mixture with the component budget. Both are callables mixture -> task results with a `key`: the
fingerprint of everything their scores depend on besides the mixture, stamped on every scores
row so a resumed search never mixes scores of different setups.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from demix.checkpoint import check_compatible, manifest_total, read_model_manifest
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.evaluate import Evaluator
from demix.evaluate.models import eval_dtype, load_for_eval
from demix.merge import DeltaStack, MergeMethod, make_method
from demix.merge.plan import MemoryPlan, plan_for
from demix.mixtures import as_dict, components_in_order, merge_weights
from demix.model import resolve_device
from demix.search.results import mixture_id
from demix.storage import fetch_files, read_manifest
from demix.train import fingerprint, train_on_mixture

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


def merge_method(config: RunConfig) -> MergeMethod:
    """The configured merge method with its parameters."""
    return make_method(config.merge.method, **config.merge.parameters)


def make_evaluator(config: RunConfig, data: CuratedData, device: torch.device) -> Evaluator:
    """Evaluator over the configured tasks, built once."""
    data_dir = fetch_files(config.evaluate.data_dir) if config.evaluate.data_dir else None
    return Evaluator(
        config.evaluate, data.load_tokenizer(), str(device), data=data, eval_data_dir=data_dir
    )


def model_id(folder: Path) -> str:
    """A model folder's training fingerprint (its path when it has none)."""
    return read_model_manifest(folder).get("fingerprint") or str(folder)


def merge_settings(config: RunConfig) -> dict:
    """The merge settings a merged proxy's scores depend on (not how merged models are saved,
    nor where the deltas live: host and device builds give the same proxies up to rounding)."""
    return config.merge.model_dump(exclude={"output_dtype", "shard_bytes", "delta_device"})


def merge_memory_plan(config: RunConfig, base: Path, k: int, device: torch.device) -> MemoryPlan:
    """Where the search's base and deltas will live (merge.delta_device), logged in one line.

    Reads only the base's safetensors headers; raises ModelError, naming what would fit, when
    nothing does.
    """
    plan = plan_for(
        base,
        k,
        merge_method(config),
        eval_dtype(config, device),
        config.merge.delta_dtype,
        device,
        config.merge.delta_device,
    )
    log.info("%s", plan.line)
    return plan


def score_key(config: RunConfig, data: CuratedData, base: Path, **what) -> str:
    """Fingerprint of everything a proxy's scores depend on besides its mixture.

    Stamped on every scores row; a resumed search refuses rows stamped differently (changed
    tasks, limits, merge settings or models) instead of mixing them. Settings that do not change
    scores (evaluation engine, batch size) are left out; the evaluation dtype as resolved on the
    run's device is in, when it is not float32 (float32 keys are those of before the setting).
    """
    dtype = eval_dtype(config, resolve_device(config.train.device))
    if dtype != torch.float32:
        what = {**what, "eval_dtype": str(dtype).removeprefix("torch.")}
    # diagnostics count only when set: keys of runs from before the setting stay valid
    unset = set() if config.evaluate.diagnostics else {"diagnostics"}
    return fingerprint(
        evaluate=config.evaluate.model_dump(exclude={"engine", "batch_size", "dtype", *unset}),
        data=read_manifest(data.root).get("files"),
        base=model_id(base),
        **what,
    )


class ProxyEvaluator:
    """Base + components loaded once; each call writes a proxy in place and evaluates it.

    `key` identifies what the scores depend on (see score_key). The memory plan (where the base
    and the deltas live) is decided and logged before any weight is loaded. Raises DemixError
    for missing components, ModelError for models that do not match the base or do not fit.
    """

    def __init__(
        self,
        config: RunConfig,
        data: CuratedData,
        base: Path,
        components: dict[str, Path],
        evaluator: Evaluator | None = None,
    ):
        comp_dirs = [Path(p) for p in components_in_order(data, components)]
        check_compatible(base, comp_dirs)
        device = resolve_device(config.train.device)
        self.config, self.data = config, data
        self.plan = merge_memory_plan(config, base, len(comp_dirs), device)
        self.model = load_for_eval(config, base, device)
        self.model.eval()
        self.stack = DeltaStack(
            self.model,
            base,
            comp_dirs,
            merge_method(config),
            delta_dtype=getattr(torch, config.merge.delta_dtype),
            delta_device=self.plan.delta_device,
        )
        self.evaluator = evaluator or make_evaluator(config, data, device)
        self.key = score_key(
            config,
            data,
            base,
            merge=merge_settings(config),
            general_ratio=config.train.general_ratio,
            components=[model_id(d) for d in comp_dirs],
        )

    @property
    def relative_norms(self) -> dict[str, float]:
        """||theta_i - base|| / ||base|| of each component, by dataset name."""
        return as_dict(self.data.names, self.stack.relative_norms)

    def __call__(self, mixture: np.ndarray) -> dict:
        self.stack.write(merge_weights(self.config, self.data, mixture))
        return self.evaluator.evaluate(self.model)


class TrainedProxyEvaluator:
    """The training-based baseline: each call trains a proxy model on the mixture from the base
    (component budget, kept under `folder` so a resumed search trains nothing again) and
    evaluates it."""

    def __init__(
        self,
        config: RunConfig,
        data: CuratedData,
        base: Path,
        folder: Path,
        evaluator: Evaluator | None = None,
    ):
        self.config, self.data, self.base, self.folder = config, data, base, folder
        self.device = resolve_device(config.train.device)
        self.evaluator = evaluator or make_evaluator(config, data, self.device)
        self.key = score_key(
            config,
            data,
            base,
            trained=config.train.model_dump(
                exclude={"checkpoint_every", "log_every", "device", "micro_batch_size", "fsdp"}
            ),
            seed=config.seed,
            model=config.model.model_dump(),
        )

    def __call__(self, mixture: np.ndarray) -> dict:
        out = self._folder(mixture_id(mixture, self.config.search.sampler.grid))
        mix = as_dict(self.data.names, mixture)
        train_on_mixture(self.config, self.data, self.base, "reference", out.name, mix, out)
        model = load_for_eval(self.config, out, self.device)
        return self.evaluator.evaluate(model)

    def _folder(self, mixture_key: str) -> Path:
        return self.folder / f"proxy-{mixture_key}"

    def trained_tokens(self, ids: list[str]) -> int:
        """Training tokens of the proxies of mixtures `ids` (the rows of this search; other
        proxies left in the folder by an earlier search are not counted)."""
        return int(manifest_total([self._folder(i) for i in ids], "tokens"))
