"""A component's relative delta norm is recorded in its manifest once it is trained, so that
`evaluate finals` reads manifests through the component index and never the weights."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from demix.checkpoint import MODEL_KIND, RELATIVE_DELTA_NORM
from demix.config import ArchitectureConfig
from demix.merge import record_relative_delta_norm, relative_delta_norms
from demix.model import build_tiny_llama
from demix.stages import read_component_manifests, write_model_index
from demix.storage import read_manifest, write_manifest

from .launcher import Store

ARCH = ArchitectureConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
)
NAMES = ("general", "code", "math")


def _model(folder, seed: int, name: str | None = None, scale: float = 0.0):
    """A tiny Llama saved with a model manifest; `scale`: noise added to the seed-0 weights."""
    model = build_tiny_llama(ARCH, vocab_size=96, eos_token_id=0, seed=0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(folder)
    write_manifest(folder, MODEL_KIND, role="component" if name else "base", name=name or "base")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("norms")
    base = _model(root / "base", 0)
    components = [_model(root / n, 10 + k, n, 0.01 * (k + 1)) for k, n in enumerate(NAMES)]
    return base, components


def test_the_recorded_norm_is_relative_delta_norms_exactly(models, monkeypatch):
    base, components = models
    expected = relative_delta_norms(base, components)  # all K at once, as evaluate finals did
    for folder, norm in zip(components, expected, strict=True):
        assert record_relative_delta_norm(folder, base) == norm  # exactly, not approximately
        manifest = read_manifest(folder, MODEL_KIND, verify=True)  # the files still verify
        assert manifest[RELATIVE_DELTA_NORM] == norm and list(manifest)[-1] == "files"
        text = (folder / "manifest.json").read_text()
        assert json.loads(text)[RELATIVE_DELTA_NORM] == norm  # JSON keeps every bit
    assert len(set(expected)) == 3 and all(n > 0 for n in expected)

    # recorded once: a rerun (a retried task, a finished model) reads it back
    weights = components[0] / "model.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(b"")  # it would fail to read the weights now
    assert record_relative_delta_norm(components[0], base) == expected[0]
    weights.write_bytes(saved)


def test_only_the_main_process_writes_the_norm(tmp_path, monkeypatch):
    base = _model(tmp_path / "base", 0)
    component = _model(tmp_path / "code", 1, "code", 0.01)
    before = (component / "manifest.json").read_bytes()
    monkeypatch.setenv("RANK", "1")  # another process of `accelerate launch`
    assert record_relative_delta_norm(component, base) is None
    assert (component / "manifest.json").read_bytes() == before
    monkeypatch.setenv("RANK", "0")
    assert record_relative_delta_norm(component, base) == relative_delta_norms(base, [component])[0]


def test_evaluate_finals_reads_the_norms_from_manifests_in_the_bucket(
    gcs, models, tmp_path, caplog, monkeypatch
):
    """The component index names gs:// URIs; reading it fetches each manifest alone (nothing
    else lands in the cache). A component trained before norms were recorded is fetched and
    measured once, with a warning."""
    base, components = models
    expected = relative_delta_norms(base, components)
    for folder in components:
        record_relative_delta_norm(folder, base)
    store, index = Store(gcs.bucket), []
    for name, folder in zip(NAMES, components, strict=True):
        uri = f"{store.root}/run/train-model-{name}/model"
        store.upload(folder, uri)
        index.append((folder, uri))
    write_model_index(index, tmp_path / "index.json")

    manifests = read_component_manifests(tmp_path / "index.json", base)
    assert {n: m[RELATIVE_DELTA_NORM] for n, m in manifests.items()} == dict(
        zip(NAMES, expected, strict=True)
    )
    assert manifests["code"]["name"] == "code" and manifests["code"]["files"]
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]

    old = json.loads((components[1] / "manifest.json").read_text())  # an older component
    del old[RELATIVE_DELTA_NORM]
    store.bucket.blob(store.key(f"{index[1][1]}/manifest.json")).upload_from_string(json.dumps(old))
    monkeypatch.setattr(logging.getLogger("demix"), "propagate", True)  # to caplog
    with caplog.at_level(logging.WARNING, logger="demix"):
        manifests = read_component_manifests(tmp_path / "index.json", base)
    assert manifests["code"][RELATIVE_DELTA_NORM] == expected[1]
    assert "component code has no relative delta norm recorded" in caplog.text
