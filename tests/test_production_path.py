"""The path a pre-training team takes, under Kubeflow's launcher semantics (tests/launcher.py):
their own base model (a plain Hugging Face folder written by save_pretrained) and candidate
data (Parquet and JSONL) in a bucket, the config given by URI as from the KFP UI, the pipeline
root from the compiled spec, and caching as the KFP backend does it across three runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import pipeline
from deploy.submit import package_root

from .conftest import smoke_config_dict
from .launcher import Launcher, Store, TaskCache

TRAINING = ("train-model", "train-final")


def _plain_base(folder: Path, corpus_dir: Path, tmp_path: Path) -> Path:
    """A tiny Llama and a fast BPE tokenizer saved with save_pretrained: no demix manifest."""
    from demix.config import ArchitectureConfig, parse_config
    from demix.data.curate import curate
    from demix.data.shards import CuratedData
    from demix.model import build_tiny_llama

    config = parse_config(smoke_config_dict(corpus_dir))
    curate(config.data, tmp_path / "tokenizer-source", config.seed)
    tokenizer = CuratedData(tmp_path / "tokenizer-source").load_tokenizer()
    arch = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    model = build_tiny_llama(arch, len(tokenizer), tokenizer.eos_token_id, seed=7)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not (folder / "manifest.json").exists()
    return folder


def _upload_folder(store: Store, local: Path, uri: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.bucket.blob(store.key(f"{uri}/{path.relative_to(local)}")).upload_from_filename(
            str(path)
        )


def _bucket_inputs(gcs, corpus_dir: Path, tmp_path: Path) -> tuple[Store, str, dict]:
    """Base, data (general as Parquet, code and math as JSONL) and config in the bucket."""
    store = Store(gcs.bucket)
    bucket = f"gs://{gcs.bucket}"
    base = _plain_base(tmp_path / "base", corpus_dir, tmp_path)
    _upload_folder(store, base, f"{bucket}/models/tiny-base")
    raw = smoke_config_dict(corpus_dir)
    for spec in raw["data"]["datasets"]:
        name = spec["name"]
        if name == "general":
            lines = (corpus_dir / "general.jsonl").read_text().splitlines()
            texts = [json.loads(line)["text"] for line in lines]
            table = pa.table({"text": texts})
            pq.write_table(table, tmp_path / "general.parquet")
            store.upload(tmp_path / "general.parquet", f"{bucket}/data/general/part-0.parquet")
            spec["paths"] = [f"{bucket}/data/general"]
        else:
            store.upload(corpus_dir / f"{name}.jsonl", f"{bucket}/data/{name}/{name}.jsonl")
            spec["paths"] = [f"{bucket}/data/{name}"]
    raw["model"]["base"] = f"{bucket}/models/tiny-base"
    del raw["model"]["architecture"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    store.upload(tmp_path / "run.yaml", f"{bucket}/configs/run.yaml")
    return store, f"{bucket}/configs/run.yaml", raw


def _training(launcher: Launcher) -> dict[str, dict]:
    """Each training task of a run: executed or cached, reused or trained, its model's name."""
    out = {}
    for path, record in launcher.records.items():
        if path.split("/")[-1].startswith(TRAINING):
            meta = record["artifacts"]["model"][0]["metadata"]
            out[path] = {
                "cached": path in launcher.cached,
                "reused": bool(meta.get("reused_from")),
                "name": meta.get("name"),
                "role": meta.get("role", "final"),
                "copied": bool(meta.get("base_source")),  # model.base, published as is
            }
    return out


def _show(title: str, launcher: Launcher, seconds: float) -> None:
    executed = [p for p in launcher.records if p not in launcher.cached]
    print(
        f"\n{title}: {len(executed)} tasks executed, {len(launcher.cached)} cache hits, "
        f"{seconds:.0f} s"
    )
    for path, row in sorted(_training(launcher).items()):
        done = "copied" if row["copied"] else ("reused" if row["reused"] else "trained")
        state = "cached" if row["cached"] else done
        print(f"  {path:<48} {row['role']:<10} {row['name']!s:<22} {state}")


@pytest.mark.slow
def test_own_base_and_bucket_data_from_the_ui_rerun_incrementally(gcs, tmp_path, corpus_dir):
    from demix.cli import main as demix_main

    store, config_uri, raw = _bucket_inputs(gcs, corpus_dir, tmp_path)
    package = tmp_path / "kubeflow.yaml"
    root = f"gs://{gcs.bucket}/runs"
    argv = ["compile", "--out", str(package), "--config", str(tmp_path / "run.yaml")]
    assert pipeline.main([*argv, "--pipeline-root", root, "--allow-local-images"]) == 0
    assert package_root(package) == root
    store = Store(gcs.bucket, root="runs")  # the root a UI run gets: the spec's default
    cache = TaskCache()
    params = {"config_uri": config_uri, "num_eval_workers": 2}  # as typed into the run form

    def run(n: int) -> tuple[Launcher, dict]:
        launcher = Launcher(package, store, tmp_path / f"work-{n}", cache)
        started = time.perf_counter()
        launcher.run(params)
        _show(f"run {n}", launcher, time.perf_counter() - started)
        evaluated = launcher.records["finals/evaluate-final"]  # in the finals sub-graph
        summary_uri = evaluated["artifacts"]["summary"][0]["uri"]
        blob = store.bucket.blob(store.key(f"{summary_uri}/summary.json"))
        return launcher, json.loads(blob.download_as_bytes())

    first, summary = run(1)
    trained = _training(first)
    assert trained and not any(r["cached"] or r["reused"] for r in trained.values())
    components = {r["name"] for r in trained.values() if r["role"] == "component"}
    assert components == {"general", "code", "math"}
    assert demix_main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "lib")]) == 0
    library = json.loads((tmp_path / "lib" / "summary.json").read_text())
    assert summary["mixture"] == pytest.approx(library["mixture"], abs=1e-9)

    second, again = run(2)  # nothing changed: every task but the first is a cache hit
    assert [p for p in second.records if p not in second.cached] == ["read-inputs"]
    assert again["mixture"] == summary["mixture"]

    with open(corpus_dir / "math.jsonl") as fh:  # one candidate's object changes
        lines = fh.readlines()
    extra = [
        json.dumps({"text": f"Problem {i}: {i} * 3 = {3 * i}. " * 4}) + "\n" for i in range(40)
    ]
    (tmp_path / "math.jsonl").write_text("".join(lines + extra))
    store.upload(tmp_path / "math.jsonl", f"gs://{gcs.bucket}/data/math/math.jsonl")
    third, _ = run(3)
    rows = _training(third)
    retrained = {r["name"] for r in rows.values() if r["role"] == "component" and not r["reused"]}
    assert retrained == {"math"}  # exactly the changed candidate's component trains
    assert all(
        r["reused"] for r in rows.values() if r["role"] == "component" and r["name"] != "math"
    )
