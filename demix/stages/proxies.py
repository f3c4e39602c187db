"""Proxy stages: the proxy evaluators (merged in memory, or trained: the baseline), the one of
`search.method`, the evaluation of a round's proposals, and the chosen mixture's merged model
on disk.

`ProxyEvaluator` (DeMix) loads the base and the components once and builds each proxy in place
by weighted merging; `TrainedProxyEvaluator` (the training-based baseline) trains a model per
mixture with the component budget. Both are callables mixture -> task results with a `key`
(demix.proxies.score_key) stamped on every scores row. They load models, so torch and the
evaluation stack are imported when one is made, not when the stages are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from demix import merge, search, train
from demix.checkpoint import check_compatible, manifest_total
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.mixtures import as_dict, components_in_order
from demix.search.sampler import validate_mixture
from demix.stages.values import Run, run_mixing

if TYPE_CHECKING:
    from demix.evaluate import Evaluator


class ProxyEvaluator:
    """Base + components loaded once; each call writes a proxy in place and evaluates it.

    `key` identifies what the scores depend on (see demix.proxies.score_key). The memory plan
    (where the base and the deltas live) is decided and logged before any weight is loaded.
    Raises DemixError for missing components, ModelError for models that do not match the base
    or do not fit.
    """

    def __init__(
        self,
        config: RunConfig,
        data: CuratedData,
        base: Path,
        components: dict[str, Path],
        evaluator: Evaluator | None = None,
    ):
        import torch  # with the model stack below: on first use (see the module docstring)

        from demix.evaluate.models import load_for_eval
        from demix.model import resolve_device
        from demix.proxies import (
            make_evaluator,
            merge_memory_plan,
            merge_method,
            merge_settings,
            model_id,
            score_key,
        )

        comp_dirs = [Path(p) for p in components_in_order(data, components)]
        check_compatible(base, comp_dirs)
        device = resolve_device(config.train.device)
        self.config, self.data = config, data
        self.mixing = run_mixing(config, data)
        self.plan = merge_memory_plan(config.merge, config.evaluate, base, len(comp_dirs), device)
        self.model = load_for_eval(config.evaluate, config.model, base, device)
        self.model.eval()
        self.stack = merge.DeltaStack(
            self.model,
            base,
            comp_dirs,
            merge_method(config.merge),
            delta_dtype=getattr(torch, config.merge.delta_dtype),
            delta_device=self.plan.delta_device,
        )
        self.evaluator = evaluator or make_evaluator(config.evaluate, data, device)
        self.key = score_key(
            config.evaluate,
            data,
            base,
            device=device,
            merge=merge_settings(config.merge),
            general_ratio=config.train.general_ratio,
            components=[model_id(d) for d in comp_dirs],
        )

    @property
    def relative_norms(self) -> dict[str, float]:
        """||theta_i - base|| / ||base|| of each component, by dataset name."""
        return as_dict(self.data.names, self.stack.relative_norms)

    def __call__(self, mixture: np.ndarray) -> dict:
        weights = self.mixing.merge_weights(mixture)
        self.stack.write(weights)
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
        from demix.model import resolve_device
        from demix.proxies import make_evaluator, score_key

        self.config, self.data, self.base, self.folder = config, data, base, folder
        self.device = resolve_device(config.train.device)
        self.evaluator = evaluator or make_evaluator(config.evaluate, data, self.device)
        self.key = score_key(
            config.evaluate,
            data,
            base,
            device=self.device,
            trained=config.train.model_dump(
                exclude={"checkpoint_every", "log_every", "device", "micro_batch_size", "fsdp"}
            ),
            seed=config.seed,
            model=config.model.model_dump(),
        )

    def __call__(self, mixture: np.ndarray) -> dict:
        from demix.evaluate.models import load_for_eval

        config, data = self.config, self.data
        out = self._folder(search.mixture_id(mixture, config.search.sampler.grid))
        mix = as_dict(data.names, mixture)
        train.train_on_mixture(
            config.train,
            config.model,
            config.seed,
            data,
            self.base,
            "reference",
            out.name,
            mix,
            out,
        )
        model = load_for_eval(config.evaluate, config.model, out, self.device)
        return self.evaluator.evaluate(model)

    def _folder(self, mixture_key: str) -> Path:
        return self.folder / f"proxy-{mixture_key}"

    def trained_tokens(self, ids: list[str]) -> int:
        """Training tokens of the proxies of mixtures `ids` (the rows of this search; other
        proxies left in the folder by an earlier search are not counted)."""
        return int(manifest_total([self._folder(i) for i in ids], "tokens"))


def make_proxy(run: Run, folder: Path, evaluator: Evaluator | None = None):
    """The proxy evaluator of `search.method`: merged (components) or trained (under `folder`)."""
    config, data, base = run.config, run.data, run.base
    if config.search.method == "trained":
        return TrainedProxyEvaluator(config, data, base, folder / "proxies", evaluator)
    return ProxyEvaluator(config, data, base, run.components, evaluator)


def evaluate_proxies_stage(run: Run, proposals: list[dict], out: Path) -> list[dict]:
    """Build and evaluate each proposed proxy; rows appended to the JSONL table `out`."""
    table = search.ScoresTable(out)
    if proposals and not {p["id"] for p in proposals} <= table.ids():
        proxy = make_proxy(run, out.parent)
        search.evaluate_proposals(proposals, run.data.names, proxy, table, key=proxy.key)
    return table.rows()


def merge_stage(run: Run, mixture: dict[str, float], out: Path) -> dict:
    """Write the merged model of a data mixture to `out`; returns its manifest, with the
    relative delta norms by dataset name and the components that moved far from the base
    (`large_updates`, also logged as a warning).

    Raises MixtureError for a bad mixture, DemixError/ModelError for missing or mismatched models.
    """
    from demix.proxies import merge_method, warn_large_updates  # torch: on first use

    config, data, base = run.config, run.data, run.base
    weights = validate_mixture(mixture, data.names)
    comp_dirs = components_in_order(data, run.components)
    check_compatible(base, comp_dirs)
    norms = merge.relative_delta_norms(base, comp_dirs)
    manifest = merge.merge_to_disk(
        base,
        comp_dirs,
        run_mixing(config, data).merge_weights(weights),
        out,
        method=merge_method(config.merge),
        dtype=None if config.merge.output_dtype == "auto" else config.merge.output_dtype,
        shard_bytes=config.merge.shard_bytes,
        data_mixture=as_dict(data.names, weights),
        relative_delta_norms=norms,
    )
    by_name = as_dict(data.names, norms)
    large = warn_large_updates(by_name)
    return {**manifest, "relative_delta_norms": by_name, "large_updates": sorted(large)}
