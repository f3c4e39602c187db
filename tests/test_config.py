"""Config loading: the shipped configs validate; bad keys and values name their key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from demix.config import load_config, parse_config
from demix.errors import ConfigError

from .conftest import smoke_config_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name",
    [
        "demo.yaml",
        "example-gpu.yaml",
        "example-gcs.yaml",
        "reproduce.yaml",
        "reproduce-n6.yaml",
        "reproduce-n9.yaml",
    ],
)
def test_shipped_configs_validate_and_open_with_the_command(name):
    path = ROOT / "configs" / name
    config = load_config(path)
    assert len(config.data.datasets) >= 3
    assert path.read_text().startswith("# Run with:")


def test_example_gpu_has_seven_datasets_and_a_real_base():
    config = load_config(ROOT / "configs" / "example-gpu.yaml")
    assert len(config.data.datasets) == 7
    assert config.model.base and config.train.base is None


def test_scaling_configs_split_the_reproduce_corpus_by_source():
    """N = 6 and 9 candidates: the same three files, every document in exactly one candidate
    (the MATH subjects, stdlib names and the two general sources as the fetch writes them)."""
    from fnmatch import fnmatchcase

    three = load_config(ROOT / "configs" / "reproduce.yaml")
    sources = {
        "general.jsonl": ["brown/ca01", "sotu/1790-George_Washington"],
        "code.jsonl": [f"stdlib/{c}mod.py" for c in "_abcdefghijklmnopqrstuvwxyz"],
        "math.jsonl": [
            f"math/{s}/1"
            for s in (
                "algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                "number_theory", "prealgebra", "precalculus",
            )
        ],
    }  # fmt: skip
    n3 = load_config(ROOT / "configs" / "reproduce-n3.yaml")
    assert [d.name for d in n3.data.datasets] == [d.name for d in three.data.datasets]
    assert (n3.train.base, n3.model.architecture, n3.data.tokenizer, n3.seed) == (
        three.train.base, three.model.architecture, three.data.tokenizer, three.seed
    )  # fmt: skip
    for n in (6, 9):
        config = load_config(ROOT / "configs" / f"reproduce-n{n}.yaml")
        assert len(config.data.datasets) == n
        assert config.model.base == "runs/reproduce-n3/models/base"
        assert (config.search, config.fidelity, config.final) == (n3.search, n3.fidelity, n3.final)
        assert config.train.component == three.train.component
        assert config.evaluate.limit == three.evaluate.limit
        for file, examples in sources.items():
            for source in examples:
                owners = [
                    d.name
                    for d in config.data.datasets
                    if d.paths[0].endswith(file)
                    and any(fnmatchcase(source, p) for p in d.where["source"])
                ]
                assert len(owners) == 1, (n, source, owners)


def test_example_gcs_reads_everything_from_the_bucket():
    """Every input a pod needs is a gs:// object (no local path exists in a pod), with a valid
    bucket and a path inside it; the evaluation needs no data outside the curated artifact."""
    from demix.storage import split_gs

    config = load_config(ROOT / "configs" / "example-gcs.yaml")
    specs = [*config.data.datasets, *config.data.targets]
    uris = [path for spec in specs for path in spec.paths] + [config.model.base]
    assert len(uris) == 7
    for uri in uris:
        assert uri.startswith("gs://"), uri
        split_gs(uri)  # a valid bucket name and a path inside the bucket
    tasks = [task for names in config.evaluate.categories.values() for task in names]
    assert tasks and all(task.startswith("heldout:") for task in tasks)
    assert config.train.base is None  # the base model is the bucket's, not trained


def test_search_round_sizes_halve():
    config = load_config(ROOT / "configs" / "demo.yaml")
    assert config.search.round_sizes == [8, 4, 2]


def _mutate(raw: dict, path: str, value) -> dict:
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[keys[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("train.bogus", 1, "train.bogus: unknown key"),
        ("train.batch_size", "many", "train.batch_size"),
        ("train.base.tokens", -5, "train.base.tokens"),
        ("train.general_ratio", 1.5, "train.general_ratio"),
        ("search.n", 2, "search.n"),
        ("data.general", "nope", "general='nope' is not one of the datasets"),
        (
            "evaluate.categories",
            {"x": ["heldout:missing"]},
            "'heldout:missing' names no dataset or target",
        ),
        ("model.architecture.num_heads", 3, "not divisible by num_heads=3"),
    ],
)
def test_bad_values_name_the_key(tmp_path, path, value, expected):
    raw = _mutate(smoke_config_dict(tmp_path), path, value)
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "cfg.yaml")
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_targets_share_the_dataset_namespace_and_can_be_heldout_tasks(tmp_path):
    raw = smoke_config_dict(tmp_path)
    raw["data"]["targets"] = [{"name": "general", "paths": [str(tmp_path / "t.jsonl")]}]
    with pytest.raises(ConfigError, match="duplicate dataset names .'general'. .data.datasets and"):
        parse_config(raw, "cfg.yaml")
    raw["data"]["targets"][0]["name"] = "tickets"
    raw["evaluate"]["categories"]["support"] = ["heldout:tickets"]
    config = parse_config(raw, "cfg.yaml")
    assert config.data.target_names == ["tickets"] and "tickets" not in config.data.names
    raw["evaluate"]["categories"]["support"] = ["heldout:ticket"]
    with pytest.raises(ConfigError, match="names no dataset or target"):
        parse_config(raw, "cfg.yaml")


def test_duplicate_dataset_names(tmp_path):
    raw = smoke_config_dict(tmp_path)
    raw["data"]["datasets"][1]["name"] = "general"
    with pytest.raises(ConfigError, match="duplicate dataset names"):
        parse_config(raw)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)


def test_the_ties_family_needs_component_weights_that_cannot_be_negative(tmp_path):
    raw = smoke_config_dict(tmp_path)  # train.general_ratio 0.5
    for method in ("ties", "dare_ties"):
        raw["merge"] = {"method": method, "weights": "data"}
        with pytest.raises(ConfigError, match="can be negative.*merge.weights: hull or component"):
            parse_config(raw)
        for weights in ("hull", "component"):  # c >= 0 by construction
            raw["merge"]["weights"] = weights
            assert parse_config(raw).merge.weights == weights
    raw["merge"] = {"method": "linear"}
    raw["fidelity"] = {"ablations": [{"method": "linear"}, {"method": "ties", "weights": "data"}]}
    with pytest.raises(ConfigError, match=r"fidelity\.ablations\.1\.weights: hull or component"):
        parse_config(raw)
    raw["fidelity"]["ablations"][1]["weights"] = "component"
    assert [a.method for a in parse_config(raw).fidelity.ablations] == ["linear", "ties"]
    raw["fidelity"]["ablations"][1]["drop_rate"] = 0.5  # a parameter ties does not take
    with pytest.raises(ConfigError, match="drop_rate does not apply to method 'ties'"):
        parse_config(raw)
    del raw["fidelity"]
    raw["merge"] = {"method": "dare_ties", "weights": "data"}
    raw["train"]["general_ratio"] = 0.0  # M = I: c = d under `data` too
    assert parse_config(raw).merge.method == "dare_ties"


SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_merges_with_the_mapping_that_measured_best(path):
    """`component` (or `hull`) in every shipped config; `data` only as an ablation row."""
    config = load_config(path)
    assert config.merge.weights in ("component", "hull")


@pytest.mark.parametrize("name", ["demo.yaml", "reproduce.yaml"])
def test_demo_and_reproduce_score_capabilities_with_own_domain_losses_beside(name):
    """The objective is scored on capability tasks where mixtures interact; the held-out
    own-domain losses of math and code are diagnostics in no category; the base is the branch
    point (warmup-stable) and every branch decays."""
    config = load_config(ROOT / "configs" / name)
    categories = config.evaluate.categories
    assert categories["math"] == ["gsm8k_bpb", "math500_bpb"]
    assert categories["code"] == ["humaneval_bpb", "mbpp_bpb"]
    assert categories["general"] == ["heldout:general"]
    assert config.evaluate.diagnostic_tasks == ["heldout:math", "heldout:code"]
    assert config.data.min_heldout_documents >= 64
    assert config.train.base.schedule == "wsd"
    assert config.train.component.schedule == config.train.final.schedule == "cosine"


def test_reproduce_has_a_target_as_its_own_category():
    config = load_config(ROOT / "configs" / "reproduce.yaml")
    assert config.data.target_names == ["docs"]
    assert config.evaluate.categories["docs"] == ["heldout:docs"]
    assert [a.weights for a in config.fidelity.ablations].count("data") == 1


def test_diagnostics_must_name_a_dataset(tmp_path):
    raw = smoke_config_dict(tmp_path)
    raw["evaluate"]["diagnostics"] = ["heldout:nowhere"]
    with pytest.raises(ConfigError, match=r"evaluate.diagnostics: 'heldout:nowhere' names no"):
        parse_config(raw)
    raw["evaluate"]["diagnostics"] = ["heldout:code"]
    config = parse_config(raw)
    assert config.evaluate.tasks[-1] == "heldout:code"  # evaluated: in a category already
    assert config.evaluate.diagnostic_tasks == []
