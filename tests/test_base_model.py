"""The user's own base (`model.base`): a plain Hugging Face folder (no demix manifest) on this
machine, in a bucket, or a hub id; fetched and verified once, fingerprinted by content, and
entering the pipeline as an artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from demix import base_model
from demix import gcs as gcs_io
from demix.cli import main
from demix.config import parse_config
from demix.errors import ConfigError, ModelError
from demix.storage import MANIFEST, read_manifest

from .conftest import smoke_config_dict

# The base's shape differs from the smoke config's architecture (hidden 32, 2 heads,
# intermediate 64, vocab 320): what is trained from it must have the base's.
BASE_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
INTERMEDIATE = 80
VOCAB = 300


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory, corpus_dir) -> Path:
    """A tiny Llama and a fast BPE tokenizer trained here, saved with save_pretrained: a plain
    Hugging Face folder, no demix manifest."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from demix.data.tokenizer import train_tokenizer

    texts = [
        json.loads(line)["text"]
        for name in ("general", "code", "math")
        for line in (corpus_dir / f"{name}.jsonl").read_text().splitlines()
    ]
    tokenizer = train_tokenizer(texts, VOCAB)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **BASE_SHAPE,
        num_key_value_heads=4,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=64,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("plain") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("a model card: not part of the model\n")
    assert not (folder / MANIFEST).exists()
    return folder


def _config(raw_base: str, corpus_dir: Path) -> dict:
    raw = smoke_config_dict(corpus_dir)
    raw["model"] = {"base": raw_base}
    raw["train"].pop("base")
    return raw


@pytest.fixture
def counted_downloads(monkeypatch):
    """Every object downloaded through demix.gcs, by name."""
    names: list[str] = []
    real = gcs_io.download_file

    def counting(blob, dest, check=None):
        names.append(blob.name)
        return real(blob, dest, check)

    monkeypatch.setattr(gcs_io, "download_file", counting)
    return names


# ------------------------------------------------------------------------------ the config


@pytest.mark.parametrize(
    ("value", "form"),
    [
        ("/models/llama", "local"),
        ("./org/name", "local"),
        ("runs/reproduce-n3/models/base", "local"),
        ("/gcs/my-bucket/models/Qwen2.5-0.5B", "local"),
        ("gs://my-bucket/models/Qwen2.5-0.5B", "gcs"),
        ("Qwen/Qwen2.5-0.5B", "hub"),
        ("Qwen/Qwen2.5-0.5B@main", "hub"),
        ("meta-llama/Llama-3.2-1B@" + "0" * 40, "hub"),
    ],
)
def test_the_config_classifies_the_base(tmp_path, corpus_dir, value, form):
    config = parse_config(_config(value, corpus_dir))
    assert config.model.base_form == form


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "give a folder, a gs:// URI or a hub id"),
        (" Qwen/Qwen2.5-0.5B", "give a folder, a gs:// URI or a hub id"),
        ("s3://bucket/model", "unknown scheme s3://"),
        ("https://models.example/org/name", "unknown scheme https://"),
        ("gs://", "no bucket name"),
        ("gs://Bad_Bucket/model", "not a valid bucket name"),
        ("gs://my-bucket", "give a path inside the bucket"),
        ("Qwen/Qwen2.5-0.5B@", "not a hub id"),
        ("Qwen/Qwen 2.5@main", "not a hub id"),
    ],
)
def test_a_malformed_base_is_refused_in_one_line(corpus_dir, value, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(_config(value, corpus_dir), "cfg.yaml")
    message = str(err.value)
    assert message.startswith("cfg.yaml: model.base: ") and expected in message
    assert "\n" not in message


# ------------------------------------------------------------------------------ local folder


def test_a_local_plain_folder_is_verified_and_fingerprinted_by_content_once(
    plain_base, tmp_path, monkeypatch
):
    """Content, not path: a copy elsewhere has the same fingerprint, a changed byte another;
    each file is hashed once per machine (cached by path, size and mtime)."""
    from demix.storage import files

    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    hashed: list[Path] = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    import demix.storage

    monkeypatch.setattr(demix.storage, "sha256_file", files.sha256_file)
    base = base_model.resolve_base(str(plain_base))
    assert base.form == "local" and base.folder == plain_base
    assert "README.md" not in base.files and {"config.json", "model.safetensors"} <= set(base.files)
    assert len(hashed) == len(base.files)
    assert base_model.base_fingerprint(str(plain_base)) == base.fingerprint
    assert len(hashed) == len(base.files)  # not hashed again
    copy = tmp_path / "copy"
    shutil.copytree(plain_base, copy)
    assert base_model.base_fingerprint(str(copy)) == base.fingerprint
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert base_model.base_fingerprint(str(copy)) != base.fingerprint


def test_the_base_artifact_is_a_verified_copy_with_its_lineage(plain_base, tmp_path):
    """What the pipeline's `train base` task writes: the model files and a manifest naming the
    source and the content fingerprint, the same as the source folder's."""
    out = tmp_path / "base"
    manifest = base_model.write_base_artifact(str(plain_base), out)
    assert read_manifest(out, "demix.model", verify=True) == manifest
    fingerprint = base_model.base_fingerprint(str(plain_base))
    assert manifest["role"] == "base" and manifest["base_source"] == str(plain_base)
    assert manifest["base_fingerprint"] == manifest["fingerprint"] == fingerprint
    assert manifest["base_revision"] is None
    assert base_model.base_fingerprint(str(out)) == fingerprint  # a copy of the same content
    assert not (out / "README.md").exists()


def test_a_folder_that_is_no_model_is_refused(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no \\*.safetensors weights"):
        base_model.resolve_base(str(folder))


# ------------------------------------------------------------------------------ gs://


def _upload_folder(folder: Path, bucket: str, prefix: str) -> None:
    bkt = gcs_io.bucket(bucket)
    for path in sorted(folder.iterdir()):
        gcs_io.upload_file(bkt, f"{prefix}/{path.name}", path)


def test_a_plain_folder_in_the_bucket_is_a_base(
    plain_base, gcs, tmp_path, corpus_dir, counted_downloads
):
    """No manifest needed; the fingerprint comes from one listing (nothing downloaded); the
    base is downloaded once, and a second fetch downloads nothing."""
    from demix.data.tokenizer import load_base_tokenizer
    from demix.stages import base_model_dir

    _upload_folder(plain_base, gcs.bucket, "models/tiny-llama")
    uri = f"gs://{gcs.bucket}/models/tiny-llama"
    config = parse_config(_config(uri, corpus_dir))
    assert config.model.base_form == "gcs"

    fingerprint = base_model.base_fingerprint(uri)
    assert fingerprint.startswith("gcs:") and counted_downloads == []
    # curation needs the tokenizer only: the weights stay in the bucket
    tokenizer = base_model.base_tokenizer_dir(uri)
    assert load_base_tokenizer(tokenizer).eos_token == "<|endoftext|>"
    assert "models/tiny-llama/model.safetensors" not in counted_downloads
    folder = base_model_dir(config)
    assert folder == tokenizer
    model_files = sorted(p.name for p in plain_base.iterdir() if p.name != "README.md")
    assert sorted(Path(name).name for name in counted_downloads) == model_files  # each once
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == model_files
    assert base_model_dir(config) == folder
    assert len(counted_downloads) == len(model_files)  # the second fetch downloaded nothing
    assert base_model.base_fingerprint(uri) == fingerprint

    assert base_model.model_folder(uri) == folder  # `demix merge --base gs://...` too
    # the same bytes uploaded again are the same base: nothing fetched again
    bkt = gcs_io.bucket(gcs.bucket)
    gcs_io.upload_file(bkt, "models/tiny-llama/config.json", plain_base / "config.json")
    assert base_model.base_fingerprint(uri) == fingerprint
    base_model_dir(config)
    assert len(counted_downloads) == len(model_files)
    # other bytes are another base: another fingerprint, and only that file fetched again
    changed = tmp_path / "generation_config.json"
    changed.write_text((plain_base / "generation_config.json").read_text() + "\n")
    gcs_io.upload_file(bkt, "models/tiny-llama/generation_config.json", changed)
    assert base_model.base_fingerprint(uri) != fingerprint
    assert (base_model_dir(config) / "generation_config.json").read_bytes() == changed.read_bytes()
    assert counted_downloads[len(model_files) :] == ["models/tiny-llama/generation_config.json"]


# ------------------------------------------------------------------------------ hub id


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_a_hub_id_is_refused_offline_in_one_line(tmp_path, corpus_dir, capsys, command):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir)))
    argv = [command, str(path), "--set", "model.base=Qwen/Qwen2.5-0.5B"]
    argv += ["--out", str(tmp_path / "run")] if command == "run" else []
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demix: error: model.base 'Qwen/Qwen2.5-0.5B'")
    assert "offline" in err[0] and "folder or a gs:// URI" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_hub_id_is_fetched_and_its_revision_recorded(plain_base, tmp_path, monkeypatch):
    """huggingface_hub's snapshot_download (here a stand-in that lays out a snapshot as the hub
    cache does) gives the folder; its commit is the recorded revision."""
    import huggingface_hub

    commit = "a1b2c3d4" * 5
    calls = []

    def snapshot_download(repo_id, revision=None, **kwargs):
        calls.append((repo_id, revision, kwargs))
        folder = Path(kwargs["cache_dir"]) / "models--org--tiny" / "snapshots" / commit
        if not folder.exists():
            shutil.copytree(plain_base, folder, ignore=shutil.ignore_patterns("README.md"))
        return str(folder)

    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    manifest = base_model.write_base_artifact("org/tiny@v1", tmp_path / "base")
    assert calls[0][:2] == ("org/tiny", "v1")
    assert "*.safetensors" in calls[0][2]["allow_patterns"]
    assert not any(p.endswith((".bin", ".pt")) for p in calls[0][2]["allow_patterns"])
    assert manifest["base_source"] == "org/tiny@v1" and manifest["base_revision"] == commit
    assert manifest["base_fingerprint"] == base_model.base_fingerprint(str(plain_base))
    base_model.check_base_reachable("org/tiny@v1")  # online: no refusal
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline"):
        base_model.resolve_base("org/tiny@v1")


# ------------------------------------------------------------------------------ the pipeline


@pytest.mark.slow
def test_a_local_pipeline_run_starts_from_a_plain_hf_base(plain_base, tmp_path, corpus_dir):
    """kfp.local with model.base a plain HF folder: the `train base` task writes the verified
    base as its Model artifact; the components and finals are trained from it (its shape)."""
    import pipeline

    config = tmp_path / "own-base.yaml"
    config.write_text(yaml.safe_dump(_config(str(plain_base), corpus_dir)))
    summary = pipeline.run_local(config, tmp_path / "kfp", num_eval_workers=1)
    assert set(summary["final"]) == {"chosen", "uniform", "token_prior"}
    assert summary["training_tokens"]["base"] == 0
    fingerprint = base_model.base_fingerprint(str(plain_base))
    assert summary["base_model"] == {
        "source": str(plain_base),
        "revision": None,
        "fingerprint": fingerprint,
    }
    assert fingerprint in (tmp_path / "kfp" / "report.html").read_text()
    models = {}
    for manifest in (tmp_path / "kfp" / "pipeline-root").rglob(f"model/{MANIFEST}"):
        found = json.loads(manifest.read_text())
        models.setdefault(found.get("role"), []).append(manifest.parent)
    (base,) = models["base"]
    recorded = read_manifest(base, "demix.model", verify=True)
    assert recorded["base_source"] == str(plain_base)
    assert recorded["base_fingerprint"] == base_model.base_fingerprint(str(plain_base))
    expected = json.loads((plain_base / "config.json").read_text())
    assert len(models["component"]) == 3
    for folder in [base, *models["component"]]:
        shape = json.loads((folder / "config.json").read_text())
        for key in (*BASE_SHAPE, "intermediate_size", "vocab_size"):
            assert shape[key] == expected[key], (folder, key)
    dataset = next((tmp_path / "kfp" / "pipeline-root").rglob("curate-data/dataset"))
    tokenizer = json.loads(next(dataset.rglob("tokenizer.json")).read_text())
    assert tokenizer == json.loads((plain_base / "tokenizer.json").read_text())


def test_under_launcher_semantics_the_bucket_base_enters_as_the_train_base_artifact(
    plain_base, gcs, tmp_path, corpus_dir
):
    """Kubeflow's launcher: the `train base` task, in an empty folder, fetches the plain
    gs:// base and publishes it verified as its Model; a component task, in another empty
    folder, trains from that declared artifact alone (the base's shape and tokenizer)."""
    import pipeline
    from demix.config import config_yaml
    from demix.data.curate import curate
    from demix.storage import fetch_artifact

    from .launcher import Launcher, Store, artifact

    store = Store(gcs.bucket)
    base_uri = f"gs://{gcs.bucket}/models/tiny-llama"
    _upload_folder(plain_base, gcs.bucket, "models/tiny-llama")
    config = parse_config(_config(base_uri, corpus_dir))
    curate(config.data, tmp_path / "dataset", config.seed, tokenizer_dir=plain_base)
    (tmp_path / "config.yaml").write_text(config_yaml(config))
    data_uri, config_uri = f"{store.root}/inputs/dataset", f"{store.root}/inputs/config"
    store.upload(tmp_path / "dataset", data_uri)
    store.upload(tmp_path / "config.yaml", config_uri)
    inputs = {"config": [artifact(config_uri)], "data": [artifact(data_uri, "system.Dataset")]}
    package = pipeline.compile_pipeline(
        "kubeflow", tmp_path / "kubeflow.yaml", rounds=2, allow_local_images=True
    )
    launcher = Launcher(package, store, tmp_path / "work")

    params = {"role": "base", "name": "base", "processes": 1, "cluster": ""}
    record = launcher.start("train-model", "comp-train-model", params, inputs).wait()
    (model,) = record["artifacts"]["model"]
    assert model["metadata"]["base_source"] == base_uri
    assert model["metadata"]["base_fingerprint"] == base_model.base_fingerprint(base_uri)
    params = {"role": "component", "name": "code", "processes": 1, "cluster": ""}
    inputs["init"] = [artifact(model["uri"], "system.Model")]
    record = launcher.start("train-component", "comp-train-model", params, inputs).wait()
    component = fetch_artifact(record["artifacts"]["model"][0]["uri"], "demix.model")
    base = fetch_artifact(model["uri"], "demix.model")
    assert read_manifest(base, "demix.model")["role"] == "base"
    expected = json.loads((plain_base / "config.json").read_text())
    shape = json.loads((component / "config.json").read_text())
    assert all(shape[k] == expected[k] for k in (*BASE_SHAPE, "intermediate_size", "vocab_size"))
    vocab = json.loads((component / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab == json.loads((plain_base / "tokenizer.json").read_text())["model"]["vocab"]


def test_an_unreachable_hub_is_refused_in_one_line(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=0 but no connection: one line saying to give a folder or gs:// URI."""
    import huggingface_hub

    def snapshot_download(repo_id, **kwargs):
        raise OSError("[Errno 101] Network is unreachable\nmore lines of traceback")

    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ConfigError) as err:
        base_model.resolve_base("org/unreachable")
    message = str(err.value)
    assert "\n" not in message and "cannot be reached (" in message
    assert "Network is unreachable" in message and "folder or a gs:// URI" in message
