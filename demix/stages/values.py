"""The value the stages after training take: a `Run`, built once by the recipe or the pipeline
task that has the models, instead of the config, the data, the base and the components passed
one by one through every stage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from demix.config import RunConfig
from demix.data.shards import CuratedData
from demix.mixtures import Mixing, SearchSpace, search_space


@dataclasses.dataclass(frozen=True)
class Run:
    """A run's config, its curated data, the base model's folder and the components' folders by
    dataset name (empty where a stage needs no component weights: a trained-proxy search, the
    finals' evaluation, which reads the components' manifests)."""

    config: RunConfig
    data: CuratedData
    base: Path
    components: dict[str, Path] = dataclasses.field(default_factory=dict)

    def using(self, config: RunConfig) -> Run:
        """The same data and models under another config (a recipe's variant of the run's)."""
        return dataclasses.replace(self, config=config)


def run_mixing(config: RunConfig, data: CuratedData) -> Mixing:
    """The run's Mixing (demix.mixtures): how its components mix the data, how it merges."""
    return Mixing.of(config.data, config.train, config.merge, data)


def run_search_space(config: RunConfig, data: CuratedData) -> SearchSpace:
    """The run's SearchSpace: names, token prior, floor and cap.

    Raises MixtureError where search.max_epochs cannot hold a whole mixture (search_cap).
    """
    return search_space(run_mixing(config, data), config.search, config.train, data)
