"""The pipeline's run parameters as config overrides: one table says which config key each
sets and which value leaves it unset (the config's value kept).

The unset values are sentinels (a negative number, zero, an empty string) rather than None:
kfp.local, the Kubeflow Pipelines UI and older Kubeflow backends do not all accept a parameter
left at None (docs/pipeline.md). What a parameter sets is then validated by the config model,
as a `--set` value is, so a bad one is refused naming its config key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from demix.errors import ConfigError


@dataclass(frozen=True)
class PipelineParameter:
    """One run parameter: the config key it sets and what leaves that key to the config."""

    key: str
    unset: str  # "negative": below zero; "zero": 0; "empty": ""
    json: bool = False  # the value is JSON text (parsed before it is set)

    def is_unset(self, value: object) -> bool:
        """Whether `value` is this parameter's sentinel."""
        if self.unset == "negative":
            return isinstance(value, int | float) and value < 0
        return value == ("" if self.unset == "empty" else 0)


PIPELINE_PARAMETERS: dict[str, PipelineParameter] = {
    "seed": PipelineParameter("seed", "negative"),
    "general_ratio": PipelineParameter("train.general_ratio", "negative"),
    "base_model": PipelineParameter("model.base", "empty"),
    "datasets_json": PipelineParameter("data.datasets", "empty", json=True),
    "search_n": PipelineParameter("search.n", "zero"),
    "component_tokens": PipelineParameter("train.component.tokens", "zero"),
    "final_tokens": PipelineParameter("train.final.tokens", "zero"),
}


def pipeline_overrides(values: dict[str, object]) -> dict[str, object]:
    """The dotted config overrides the pipeline's run parameters `values` make (a parameter at
    its sentinel, or absent, makes none).

    Raises ConfigError for a parameter this table does not know, or JSON text that does not
    parse, naming the parameter.
    """
    overrides: dict[str, object] = {}
    for name, value in values.items():
        if name not in PIPELINE_PARAMETERS:
            known = ", ".join(PIPELINE_PARAMETERS)
            raise ConfigError(f"pipeline parameter {name!r} is not one of {known}")
        parameter = PIPELINE_PARAMETERS[name]
        if parameter.is_unset(value):
            continue
        if parameter.json:
            try:
                value = json.loads(str(value))
            except ValueError as err:
                raise ConfigError(f"pipeline parameter {name}: not JSON ({err})") from None
        overrides[parameter.key] = value
    return overrides
