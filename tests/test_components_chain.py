"""Every component's python_func, chained in the pipeline's order on the smoke config: the
whole pipeline without an orchestrator. `make test-images` runs this file inside the CPU image
(as its non-root user, without a network) to show every task runs there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

from .conftest import smoke_config_dict


def _artifact(cls, path: Path):
    art = cls(uri=str(path))
    art.path = str(path)  # local artifacts: path == uri
    return art


@pytest.mark.slow
def test_every_component_in_pipeline_order(tmp_path, corpus_dir, eval_dir):
    from components.collect_models import collect_models
    from components.curate_data import curate_data
    from components.curate_group import curate_group
    from components.dataset_names import dataset_names
    from components.evaluate_final import evaluate_final
    from components.evaluate_proxies import evaluate_proxies
    from components.export_mixture import export_mixture
    from components.final_runs import final_runs
    from components.merge import merge
    from components.plan_curation import plan_curation
    from components.predict import predict
    from components.resolve_config import resolve_config
    from components.train_final import train_final
    from components.train_model import train_model
    from components.validate_fidelity import validate_fidelity
    from demix.merge import relative_delta_norms

    raw = smoke_config_dict(corpus_dir, eval_dir)
    raw["fidelity"] = {"references": 2}
    art = {}

    def out(cls, name: str):
        art[name] = _artifact(cls, tmp_path / name)
        return art[name]

    resolve_config.python_func(
        config_yaml=yaml.safe_dump(raw), seed=-1, general_ratio=-1.0, base_model="",
        datasets_json="", search_n=0, component_tokens=0, final_tokens=0,
        resolved=out(Artifact, "config.yaml"), compiled_rounds=2,
    )  # fmt: skip
    config = art["config.yaml"]
    groups = plan_curation.python_func(
        config=config, data_fingerprint="fp", plan=out(Artifact, "plan")
    )
    parts = [out(Artifact, f"part-{g}") for g in groups]
    for group, part in zip(groups, parts, strict=True):
        curate_group.python_func(plan=art["plan"], group=group, part=part)
    data = out(Dataset, "dataset")
    curate_data.python_func(plan=art["plan"], parts=parts, data_fingerprint="fp", dataset=data)
    assert data.metadata["token_prior"].keys() == {"general", "code", "math"}

    base = out(Model, "base")
    train_model.python_func(
        config=config, role="base", name="base", data=data, model=base,
        metrics=out(Metrics, "base-metrics"), curves=out(HTML, "base-curves.html"),
    )  # fmt: skip
    assert art["base-metrics"].metadata["tokens"] >= 12_000
    names = dataset_names.python_func(config=config)
    components = [out(Model, f"component-{n}") for n in names]
    entries = []
    for name, model in zip(names, components, strict=True):
        entries.append(train_model.python_func(
            config=config, role="component", name=name, data=data, model=model,
            metrics=out(Metrics, f"metrics-{name}"), curves=out(HTML, f"curves-{name}.html"),
            init=base,
        ))  # fmt: skip
    index = out(Artifact, "index.json")
    collect_models.python_func(entries=entries, index=index)  # names and URIs, no weights
    assert set(json.loads(Path(index.path).read_text())) == set(names)

    def propose(r: int, history=None, scores=None) -> list[int]:
        return predict.python_func(
            config=config, data=data, round_index=r, num_shards=2,
            history_out=out(Artifact, f"history-{r}.jsonl"), result=out(Artifact, f"result-{r}"),
            metrics=out(Metrics, f"predict-metrics-{r}"), report=out(HTML, f"search-{r}.html"),
            history=history, scores=scores,
        )  # fmt: skip

    shards, history = propose(0), None
    for r in (1, -1):  # the smoke config's two rounds, then the selection
        scores = [out(Artifact, f"scores-{r}-{s}") for s in shards]
        for shard, score in zip(shards, scores, strict=True):
            evaluate_proxies.python_func(
                config=config, data=data, base=base, component_index=index,
                proposals=art[f"result-{0 if r == 1 else 1}"], shard=shard, num_shards=2,
                scores=score,
            )  # fmt: skip
        history = art[f"history-{0 if r == 1 else 1}.jsonl"]
        shards = propose(r, history, scores)
    assert shards == []
    selection = art["result--1"]
    mixture = json.loads(Path(selection.path).read_text())["mixture"]
    assert set(mixture) == set(names) and sum(mixture.values()) == pytest.approx(1.0)

    export_mixture.python_func(
        config=config, data=data, selection=selection, export=out(Artifact, "export.json")
    )
    assert json.loads(Path(art["export.json"].path).read_text())["mixture"] == pytest.approx(
        mixture
    )
    validate_fidelity.python_func(
        config=config, data=data, base=base, component_index=index,
        metrics=out(Metrics, "fidelity-metrics"), fidelity=out(Artifact, "fidelity"),
        report=out(HTML, "fidelity.html"),
    )  # fmt: skip
    assert json.loads(Path(art["fidelity"].path).read_text())["n"] >= 2
    merge.python_func(
        config=config, data=data, base=base, component_index=index, selection=selection,
        metrics=out(Metrics, "merge-metrics"), merged=out(Model, "merged"),
    )  # fmt: skip
    assert (tmp_path / "merged" / "manifest.json").is_file()

    labels = final_runs.python_func(config=config)
    assert set(labels) == {"chosen", "uniform", "token_prior"}
    finals = [out(Model, f"final-{label}") for label in labels]
    for label, model in zip(labels, finals, strict=True):
        train_final.python_func(
            config=config, label=label, data=data, base=base, selection=selection,
            model=model, metrics=out(Metrics, f"final-metrics-{label}"),
            curves=out(HTML, f"final-curves-{label}.html"),
        )  # fmt: skip
    evaluate_final.python_func(
        config=config, data=data, base=base, component_index=index, finals=finals,
        selection=selection, summary=out(Artifact, "summary"), metrics=out(Metrics, "metrics"),
        report=out(HTML, "report.html"), verdict=out(Markdown, "verdict.md"),
    )  # fmt: skip
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    verdict = (tmp_path / "verdict.md").read_text()
    assert verdict.startswith("# DeMix") and "vs token_prior" in verdict
    assert f"{summary['mixture']['code']:.3f}" in verdict
    assert set(summary["final"]) == {"chosen", "uniform", "token_prior"}
    assert summary["mixture"] == pytest.approx(mixture, abs=1e-9)
    assert summary["proxies_evaluated"] == 6
    # the components' norms, recorded at training time: those of their weights, exactly
    norms = relative_delta_norms(base.path, [c.path for c in components])
    assert summary["relative_delta_norms"] == dict(zip(names, norms, strict=True))
    assert "<html" in (tmp_path / "report.html").read_text().lower()
