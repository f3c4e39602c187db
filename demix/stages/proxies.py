"""Proxy stages: the proxy evaluator of `search.method` (merged in memory, or trained), the
evaluation of a round's proposals, and the chosen mixture's merged model on disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from demix import merge, search
from demix.checkpoint import check_compatible
from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.mixtures import as_dict, components_in_order, merge_weights
from demix.search.sampler import validate_mixture

if TYPE_CHECKING:
    from demix.evaluate import Evaluator


def make_proxy(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    folder: Path,
    evaluator: Evaluator | None = None,
):
    """The proxy evaluator of `search.method`: merged (components) or trained (under `folder`)."""
    from demix.proxies import ProxyEvaluator, TrainedProxyEvaluator  # torch: on first use

    if config.search.method == "trained":
        return TrainedProxyEvaluator(config, data, base, folder / "proxies", evaluator)
    return ProxyEvaluator(config, data, base, components, evaluator)


def evaluate_proxies_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    proposals: list[dict],
    out: Path,
) -> list[dict]:
    """Build and evaluate each proposed proxy; rows appended to the JSONL table `out`."""
    table = search.ScoresTable(out)
    if proposals and not {p["id"] for p in proposals} <= table.ids():
        proxy = make_proxy(config, data, base, components, out.parent)
        search.evaluate_proposals(proposals, data.names, proxy, table, key=proxy.key)
    return table.rows()


def merge_stage(
    config: RunConfig,
    data: CuratedData,
    base: Path,
    components: dict[str, Path],
    mixture: dict[str, float],
    out: Path,
) -> dict:
    """Write the merged model of a data mixture to `out`; returns its manifest, with the
    relative delta norms by dataset name and the components that moved far from the base
    (`large_updates`, also logged as a warning).

    Raises MixtureError for a bad mixture, DemixError/ModelError for missing or mismatched models.
    """
    from demix.proxies import merge_method, warn_large_updates

    weights = validate_mixture(mixture, data.names)
    comp_dirs = components_in_order(data, components)
    check_compatible(base, comp_dirs)
    norms = merge.relative_delta_norms(base, comp_dirs)
    manifest = merge.merge_to_disk(
        base,
        comp_dirs,
        merge_weights(config, data, weights),
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
