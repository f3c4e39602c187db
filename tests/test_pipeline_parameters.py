"""The pipeline's run parameters: one table (demix.config.parameters) maps each to the config
key it sets and the sentinel that leaves the config's value; the pipeline and the component that
applies them take exactly those."""

from __future__ import annotations

import inspect
import json

import pytest
import yaml

from demix.config import parse_config, resolve_config
from demix.config.parameters import PIPELINE_PARAMETERS, pipeline_overrides
from demix.errors import ConfigError
from tests.conftest import smoke_config_dict

UNSET = {
    "seed": -1,
    "general_ratio": -1.0,
    "base_model": "",
    "datasets_json": "",
    "search_n": 0,
    "component_tokens": 0,
    "final_tokens": 0,
}


def test_the_sentinels_set_nothing_and_values_set_their_keys():
    assert pipeline_overrides(UNSET) == {}
    assert pipeline_overrides({}) == {}
    given = {
        "seed": 0,  # zero is a seed, not "unset"
        "general_ratio": 0.0,
        "base_model": "gs://b/base",
        "datasets_json": '[{"name": "a", "paths": ["gs://b/a.jsonl"]}]',
        "search_n": 8,
        "component_tokens": 1000,
        "final_tokens": 2000,
    }
    assert pipeline_overrides(given) == {
        "seed": 0,
        "train.general_ratio": 0.0,
        "model.base": "gs://b/base",
        "data.datasets": [{"name": "a", "paths": ["gs://b/a.jsonl"]}],
        "search.n": 8,
        "train.component.tokens": 1000,
        "train.final.tokens": 2000,
    }


def test_every_key_the_table_sets_is_a_config_key(corpus_dir):
    base = smoke_config_dict(corpus_dir)
    values = {
        "seed": 3,
        "general_ratio": 0.25,
        "base_model": str(corpus_dir),
        "datasets_json": json.dumps(base["data"]["datasets"][::-1]),
        "search_n": 7,
        "component_tokens": 1234,
        "final_tokens": 4321,
    }
    config = resolve_config(yaml.safe_dump(base), pipeline_overrides(values))
    assert config.seed == 3 and config.train.general_ratio == 0.25
    assert config.model.base == str(corpus_dir)
    assert [d.name for d in config.data.datasets] == [d["name"] for d in base["data"]["datasets"]][
        ::-1
    ]
    assert config.search.n == 7
    assert (config.train.component.tokens, config.train.final.tokens) == (1234, 4321)
    assert parse_config(base).seed != 3  # the table changed it, not the fixture


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"datasets_json": "[{"}, "pipeline parameter datasets_json: not JSON"),
        ({"rounds": 3}, "pipeline parameter 'rounds' is not one of seed, general_ratio"),
    ],
)
def test_a_bad_parameter_is_named_in_one_line(values, message):
    with pytest.raises(ConfigError) as caught:
        pipeline_overrides(values)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_pipeline_and_its_resolve_task_take_the_tables_parameters():
    import pipeline
    from components.resolve_config import resolve_config as component
    from deploy.placement import Placement

    declared = set(inspect.signature(component.python_func).parameters)
    assert declared - {"config_yaml", "resolved", "compiled_rounds"} == set(PIPELINE_PARAMETERS)
    params = inspect.signature(pipeline.build_pipeline(Placement()).pipeline_func).parameters
    for name, unset in UNSET.items():
        assert params[name].default == unset, name  # the pipeline's default is the sentinel
        assert PIPELINE_PARAMETERS[name].is_unset(unset)
