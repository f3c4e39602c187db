"""`demix plan`: the cost of a config per stage, before anything runs (the counts are checked
against a real local run in tests/test_pipeline.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from demix.cli import main
from demix.config import RunConfig
from demix.stages.plan import (
    ACCELERATORS,
    accelerator,
    base_shape,
    flops_per_token,
    format_plan,
    plan_table,
)
from tests.conftest import smoke_config_dict


def _config(corpus_dir, eval_dir, **changes) -> RunConfig:
    raw = smoke_config_dict(corpus_dir, eval_dir)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = raw
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return RunConfig.model_validate(raw)


def test_the_parameter_count_is_the_built_models(corpus_dir, eval_dir, tmp_path):
    """The architecture's count equals the Llama DeMix builds from it, tied or not, and a
    saved folder is counted from its safetensors headers."""
    from demix.model import build_tiny_llama

    for tied in (True, False):
        config = _config(corpus_dir, eval_dir, model__architecture__tie_word_embeddings=tied)
        arch, vocab = config.model.architecture, config.data.tokenizer.vocab_size
        model = build_tiny_llama(arch, vocab, 0, seed=0)
        built = sum(p.numel() for p in model.parameters())
        assert base_shape(config).parameters == built, tied
        model.save_pretrained(tmp_path / f"tied-{tied}")
        model_config = config.model.model_copy(update={"base": str(tmp_path / f"tied-{tied}")})
        config = config.model_copy(update={"model": model_config})
        shape = base_shape(config)
        assert shape.parameters == built and shape.tied == tied
        assert shape.source == str(tmp_path / f"tied-{tied}")


def test_training_flops_are_six_per_parameter_and_token_plus_attention(corpus_dir, eval_dir):
    config = _config(corpus_dir, eval_dir)
    shape = base_shape(config)
    seq = config.train.seq_len
    attention = 12 * shape.layers * seq * shape.hidden
    assert flops_per_token(shape, seq, training=True) == 6 * shape.parameters + attention
    assert flops_per_token(shape, seq, training=False) * 3 == 6 * shape.parameters + attention


def test_the_plan_scales_with_the_budgets_and_the_device(corpus_dir, eval_dir):
    config = _config(corpus_dir, eval_dir)
    doubled = _config(corpus_dir, eval_dir, train__component__tokens=8_000)
    h100 = accelerator("h100-80gb")
    rows = {r["stage"]: r for r in plan_table(config, h100)["stages"]}
    more = {r["stage"]: r for r in plan_table(doubled, h100)["stages"]}
    assert more["components"]["tokens"] == 2 * rows["components"]["tokens"]
    assert more["components"]["flops"] == pytest.approx(2 * rows["components"]["flops"])
    assert more["base"] == rows["base"]
    l4 = {r["stage"]: r for r in plan_table(config, accelerator("l4"))["stages"]}
    ratio = ACCELERATORS["h100-80gb"].peak_flops / ACCELERATORS["l4"].peak_flops
    assert l4["base"]["seconds"] == pytest.approx(ratio * rows["base"]["seconds"])
    # a given base is not trained; the trained-proxy search trains each proxy
    given = _config(corpus_dir, eval_dir, model__base="org/name")
    assert {r["stage"]: r for r in plan_table(given, h100)["stages"]}["base"]["flops"] == 0
    trained = _config(corpus_dir, eval_dir, search__method="trained")
    search = {r["stage"]: r for r in plan_table(trained, h100)["stages"]}["search"]
    assert search["tokens"] == search["proxies"] * config.train.component.tokens


def test_demix_plan_prints_the_table_and_json(corpus_dir, eval_dir, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir, eval_dir)))
    assert main(["plan", str(path), "--accelerator", "cpu", "--set", "search.n=8"]) == 0
    text = capsys.readouterr().out
    for stage in ("curate", "base", "components", "search", "finals", "total"):
        assert any(line.startswith(stage) for line in text.splitlines()), stage
    assert "measured by this project" in text and "rerun:" in text
    assert main(["plan", str(path), "--json", "--set", "search.n=8"]) == 0
    table = json.loads(capsys.readouterr().out)
    search = next(r for r in table["stages"] if r["stage"] == "search")
    assert search["proxies"] == sum(max(1, 8 >> r) for r in range(2))  # smoke: 2 rounds
    assert format_plan(table).splitlines()[0].startswith("plan on NVIDIA H100")
    assert not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--accelerator", "tpu"], "--accelerator tpu: give cpu or one of"),
        (["--eval-workers", "0"], "--eval-workers 0"),
    ],
)
def test_bad_plan_flags_are_one_line(argv, expected, corpus_dir, eval_dir, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir, eval_dir)))
    assert main(["plan", str(path), *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert len(lines) == 1 and expected in lines[0], err


def test_inputs_not_there_yet_leave_the_curation_size_unknown(tmp_path):
    raw = {
        "data": {"datasets": [{"name": n, "paths": [str(tmp_path / n)]} for n in ("a", "b")]},
        "train": {"base": {"tokens": 100}, "component": {"tokens": 100}, "final": {"tokens": 100}},
        "evaluate": {"categories": {"general": ["heldout:a"]}},
    }
    table = plan_table(RunConfig.model_validate(raw), accelerator("a100-80gb"))
    curate = table["stages"][0]
    assert curate["tokens"] == 0 and "size unknown" in curate["notes"][0]
    assert json.dumps(table)  # JSON-ready
