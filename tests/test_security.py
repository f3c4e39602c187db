"""Security: nothing is unpickled, remote code runs only when asked (loudly), manifests cannot
reach outside their artifact, no credentials end up in configs, compiled pipelines, logs or
reports, and the images run as a non-root user."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import pytest
import yaml

from demix.config import ArchitectureConfig, ModelConfig, parse_config
from demix.errors import DataError
from demix.model import build_tiny_llama, load_model
from demix.storage import read_manifest, write_manifest

from . import reliability
from .conftest import key_like, smoke_config_dict

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[1]
ARCH = ArchitectureConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
)


def _python_sources() -> list[Path]:
    return sorted((ROOT / "demix").rglob("*.py")) + sorted((ROOT / "components").glob("*.py"))


def test_the_code_never_unpickles():
    for path in [*_python_sources(), ROOT / "pipeline.py"]:
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        # only the config turns remote code on; no call hard-codes it
        assert not re.search(r"trust_remote_code\s*=\s*True\s*[,)]", text), path


class _Payload:
    """Unpickling this creates `marker`: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _payload(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def test_a_pickle_planted_in_a_training_checkpoint_never_runs(corpus_dir, tmp_path, one_thread):
    from demix.data.curate import curate
    from demix.data.shards import CuratedData
    from demix.train import TrainingError, train_model

    config = parse_config(smoke_config_dict(corpus_dir))
    curate(config.data, tmp_path / "data", config.seed)
    data = CuratedData(tmp_path / "data")

    def train(**kw):
        return train_model(
            tmp_path / "m", data, data.token_prior, config.train.base, config.train,
            config.model, config.seed, role="base", name="base",
            arch=config.model.architecture, quiet=True, **kw,
        )  # fmt: skip

    assert train(stop_at_step=3) is None
    ckpt, marker = tmp_path / "m.ckpt", tmp_path / "pwned"
    # an attacker who can write the checkpoint can rewrite its manifest too
    (ckpt / "model.safetensors").write_bytes(_payload(marker))
    (ckpt / "optimizer.pt").write_bytes(_payload(marker))
    write_manifest(ckpt, "demix.checkpoint", step=3)
    with pytest.raises(TrainingError, match="not a readable safetensors checkpoint") as err:
        train()
    assert "\n" not in str(err.value)
    reliability.intact(not marker.exists(), "a pickled checkpoint payload ran")


def test_a_pickle_beside_safetensors_weights_is_ignored(tmp_path):
    folder = tmp_path / "model"
    build_tiny_llama(ARCH, 64, 0, seed=0).save_pretrained(folder)
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(_payload(marker))
    (folder / "training_args.bin").write_bytes(_payload(marker))
    load_model(folder)
    reliability.intact(not marker.exists(), "a pickle next to the weights ran")


def test_trust_remote_code_is_off_unless_set_and_then_loud(tmp_path, caplog):
    assert ModelConfig().trust_remote_code is False
    folder = tmp_path / "model"
    build_tiny_llama(ARCH, 64, 0, seed=0).save_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="demix.model"):
        load_model(folder)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="demix.model"):
        load_model(folder, trust_remote_code=True)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "trust_remote_code=True" in caplog.text and "WILL BE EXECUTED" in caplog.text


def test_a_manifest_cannot_name_a_file_outside_its_artifact(tmp_path):
    root = tmp_path / "artifact"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("outside")
    (root / "link").symlink_to(tmp_path / "secret.txt")
    for entry in ("../secret.txt", "/etc/passwd", "a/../../secret.txt", "link", "a\\..\\x"):
        (root / "manifest.json").write_text(
            json.dumps({"kind": "k", "files": {entry: {"size": 7, "sha256": "0" * 64}}})
        )
        with pytest.raises(DataError, match="escapes the artifact directory"):
            read_manifest(root, verify=True)


def _no_key_like(where: str, text: str, secrets: list[str]) -> None:
    found = key_like(text)
    assert not found, f"{where}: key-like string {found!r}"
    for secret in secrets:
        assert secret not in text, f"{where}: a credential from the environment leaked"


def test_no_credentials_in_configs_compiled_pipelines_logs_or_reports(
    corpus_dir, tmp_path, monkeypatch, capsys
):
    import pipeline
    from demix.cli import main
    from demix.report import write_search_report

    # credentials in the environment, as on a developer machine or a pipeline worker
    key_file = tmp_path / "sa.json"
    secret = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    key_file.write_text(json.dumps({"type": "service_account", "private_key": secret}))
    secrets = ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"]
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key_file))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets[0])

    for config in sorted((ROOT / "configs").glob("*.yaml")):
        _no_key_like(str(config), config.read_text(), secrets)
    for target in ("kubeflow", "vertex"):
        out = pipeline.compile_pipeline(
            target, tmp_path / f"{target}.yaml", allow_local_images=True
        )
        _no_key_like(str(out), out.read_text(), secrets)

    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir)))
    assert main(["-v", "curate", str(config_path), "--out", str(tmp_path / "data")]) == 0
    logs = capsys.readouterr()
    _no_key_like("demix curate logs", logs.out + logs.err, secrets)
    manifest = (tmp_path / "data" / "manifest.json").read_text()
    _no_key_like("dataset manifest", manifest, secrets)

    history = tmp_path / "history.jsonl"
    row = {"id": "m-1", "round": 0, "weights": {"general": 0.5, "code": 0.3, "math": 0.2}}
    task = {"metric": "loss", "value": 1.0, "stderr": 0.0, "higher_is_better": False}
    history.write_text(json.dumps({**row, "tasks": {f"heldout:{n}": task for n in row["weights"]}}))
    parsed = parse_config(smoke_config_dict(corpus_dir))
    report = write_search_report(history, parsed.search, parsed.evaluate, tmp_path / "r.html")
    _no_key_like("search report", report.read_text(), secrets)


def test_images_run_as_a_non_root_user():
    dockerfile = "images/Dockerfile"  # both flavours (FLAVOR=cpu|cuda)
    text = (ROOT / dockerfile).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), f"{dockerfile}: runs as {users}"
    uid = re.search(rf"useradd\b[^\n]*--uid (\d+)[^\n]* {re.escape(users[-1])}\b", text)
    assert uid and int(uid.group(1)) > 0, f"{dockerfile}: {users[-1]} has no non-zero uid"
    assert not re.search(r"(SECRET|TOKEN|PASSWORD|API_KEY|CREDENTIALS)\s*=", text)
