"""The value the stages after training take: a `Run`, built once by the recipe or the pipeline
task that has the models, instead of the config, the data, the base and the components passed
one by one through every stage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from demix.config import RunConfig
from demix.data.shards import CuratedData


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
