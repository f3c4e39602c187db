"""Proxy stages: the proxy evaluator of `search.method` (merged in memory, or trained), the
evaluation of a round's proposals, and the chosen mixture's merged model on disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from demix import merge, search
from demix.checkpoint import check_compatible
from demix.mixtures import as_dict, components_in_order, merge_weights
from demix.search.sampler import validate_mixture
from demix.stages.values import Run

if TYPE_CHECKING:
    from demix.evaluate import Evaluator


def make_proxy(run: Run, folder: Path, evaluator: Evaluator | None = None):
    """The proxy evaluator of `search.method`: merged (components) or trained (under `folder`)."""
    from demix.proxies import ProxyEvaluator, TrainedProxyEvaluator  # torch: on first use

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
    from demix.proxies import merge_method, warn_large_updates

    config, data, base = run.config, run.data, run.base
    weights = validate_mixture(mixture, data.names)
    comp_dirs = components_in_order(data, run.components)
    check_compatible(base, comp_dirs)
    norms = merge.relative_delta_norms(base, comp_dirs)
    manifest = merge.merge_to_disk(
        base,
        comp_dirs,
        merge_weights(config.data, config.train, config.merge, data, weights),
        out,
        method=merge_method(config),
        dtype=None if config.merge.output_dtype == "auto" else config.merge.output_dtype,
        shard_bytes=config.merge.shard_bytes,
        data_mixture=as_dict(data.names, weights),
        relative_delta_norms=norms,
    )
    by_name = as_dict(data.names, norms)
    large = warn_large_updates(by_name)
    return {**manifest, "relative_delta_norms": by_name, "large_updates": sorted(large)}
