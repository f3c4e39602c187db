"""Merge algebra on tiny real Llama models: DeltaStack (in place) and the disk merge agree."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from demix.checkpoint import check_compatible
from demix.config import ArchitectureConfig
from demix.errors import MixtureError, ModelError
from demix.merge import DeltaStack, merge_to_disk
from demix.merge.delta_stack import relative_delta_norms
from demix.mixtures import component_mix_matrix, data_to_component
from demix.model import build_tiny_llama, load_model

ARCH = ArchitectureConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
)


def _perturbed(model, seed: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = build_tiny_llama(ARCH, vocab_size=96, eos_token_id=0, seed=0)
    base.save_pretrained(root / "base")
    comps = []
    for k in range(3):
        m = _perturbed(build_tiny_llama(ARCH, 96, 0, seed=0), seed=10 + k, scale=0.02)
        m.save_pretrained(root / f"c{k}")
        comps.append(root / f"c{k}")
    return root / "base", comps


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _stack(models):
    base, comps = models
    model = load_model(base)
    return model, DeltaStack(model, base, comps)


def test_one_hot_weights_give_that_component(models):
    model, stack = _stack(models)
    for k, comp in enumerate(models[1]):
        stack.write(np.eye(3)[k])
        expected = _params(load_model(comp))
        for name, value in _params(model).items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


def test_write_is_in_place_and_matches_fresh_disk_merge(models, tmp_path):
    model, stack = _stack(models)
    ptrs = [p.data_ptr() for p in model.parameters()]
    weights = [0.5, 0.7, -0.2]
    stack.write(weights)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    merge_to_disk(models[0], models[1], weights, tmp_path / "merged")
    fresh = _params(load_model(tmp_path / "merged"))
    for name, value in _params(model).items():
        torch.testing.assert_close(value, fresh[name], rtol=0, atol=1e-6)
    # the proxy is usable: a forward pass gives finite logits
    logits = model(input_ids=torch.arange(10)[None]).logits
    assert torch.isfinite(logits).all()


def test_merge_is_linear_in_the_weights(models):
    model, stack = _stack(models)
    a, b = np.array([0.2, 0.3, 0.5]), np.array([0.6, 0.1, 0.3])
    stack.write(a)
    pa = _params(model)
    stack.write(b)
    pb = _params(model)
    stack.write(0.25 * a + 0.75 * b)
    for name, value in _params(model).items():
        torch.testing.assert_close(value, 0.25 * pa[name] + 0.75 * pb[name], rtol=0, atol=1e-6)


def test_equal_components_give_themselves(models, tmp_path):
    base, comps = models
    merge_to_disk(base, [comps[1]] * 3, [0.2, 0.3, 0.5], tmp_path / "same")
    merged, expected = _params(load_model(tmp_path / "same")), _params(load_model(comps[1]))
    for name, value in merged.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", [[0.5, 0.5, 0.5], [float("nan"), 0.5, 0.5]])
def test_bad_weights_are_refused(models, weights):
    _, stack = _stack(models)
    with pytest.raises(MixtureError):
        stack.write(weights)


def test_relative_delta_norms(models):
    base, comps = models
    model, stack = _stack(models)
    b = torch.cat([p.detach().flatten() for p in load_model(base).parameters()])
    c = torch.cat([p.detach().flatten() for p in load_model(comps[0]).parameters()])
    expected = float((c - b).norm() / b.norm())
    assert relative_delta_norms(base, comps)[0] == pytest.approx(expected, rel=1e-5)
    assert stack.relative_norms[0] == pytest.approx(expected, rel=1e-5)


def test_mismatched_shapes_are_refused(models, tmp_path):
    other = build_tiny_llama(ARCH.model_copy(update={"intermediate_size": 96}), 96, 0, seed=0)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ModelError, match="mlp"):
        check_compatible(models[0], [tmp_path / "other"])


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ModelError, match="safetensors only"):
        load_model(folder)
    assert not marker.exists()


def test_missing_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        load_model(tmp_path)
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")


def test_data_to_component_hand_computed():
    general = np.array([1.0, 0.0, 0.0])
    m = component_mix_matrix(["g", "a", "b"], general, 0.5)
    np.testing.assert_allclose(m, [[1, 0.5, 0.5], [0, 0.5, 0], [0, 0, 0.5]])
    np.testing.assert_allclose(data_to_component(m, [0.5, 0.25, 0.25]), [0, 0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(data_to_component(m, [1, 0, 0]), [1, 0, 0], atol=1e-12)
    c = data_to_component(m, [0, 0.5, 0.5])
    np.testing.assert_allclose(c, [-1, 1, 1], atol=1e-12)
    assert c.sum() == pytest.approx(1.0)


def test_data_to_component_with_prior_as_general():
    prior = np.array([0.2, 0.5, 0.3])
    m = component_mix_matrix(["a", "b", "c"], prior, 0.4)
    d = np.array([0.1, 0.6, 0.3])
    c = data_to_component(m, d)
    np.testing.assert_allclose(m @ c, d, atol=1e-12)
    # closed form (Sherman-Morrison): c = (d - r * g) / (1 - r) when sum(d) = 1
    np.testing.assert_allclose(c, (d - 0.4 * prior) / 0.6, atol=1e-12)


def test_sharded_streaming_merge_equals_single_file(models, tmp_path):
    base, comps = models
    # sharded inputs too: the base re-saved in small shards with an index
    sharded_base = tmp_path / "sharded-base"
    load_model(base).save_pretrained(sharded_base, max_shard_size="40KB")
    assert (sharded_base / "model.safetensors.index.json").is_file()
    weights = [0.2, 0.5, 0.3]
    merge_to_disk(base, comps, weights, tmp_path / "one")
    manifest = merge_to_disk(sharded_base, comps, weights, tmp_path / "many", shard_bytes=30_000)
    files = manifest["weight_files"]
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    one, many = _params(load_model(tmp_path / "one")), _params(load_model(tmp_path / "many"))
    for name, value in one.items():
        torch.testing.assert_close(many[name], value, rtol=0, atol=0)


def test_disk_merge_output_dtype(models, tmp_path):
    base, comps = models
    merge_to_disk(base, comps, [0.2, 0.5, 0.3], tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="pt") as st:
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}  # noqa: SIM118


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_disk_merge_of_bf16_models_is_computed_in_fp32(models, tmp_path, method):
    """bf16 inputs are read as they are and accumulated in fp32: the result equals the fp32
    merge of the same bf16 values, in the inputs' dtype (the base's)."""
    from safetensors.torch import load_file

    base, comps = models
    halves = []
    for i, folder in enumerate([base, *comps]):
        out = tmp_path / f"bf16-{i}"
        out.mkdir()
        for f in folder.iterdir():
            if f.name == "model.safetensors":
                tensors = {k: v.to(torch.bfloat16) for k, v in load_file(f).items()}
                save_file(tensors, out / f.name, metadata={"format": "pt"})
            elif f.name != "manifest.json":
                (out / f.name).write_bytes(f.read_bytes())
        halves.append(out)
    weights = [0.2, 0.5, 0.3]
    merge_to_disk(halves[0], halves[1:], weights, tmp_path / "from-bf16", method=method)
    upcast = tmp_path / "fp32-of-bf16"
    upcast.mkdir()
    for i, folder in enumerate(halves):
        dst = upcast / str(i)
        dst.mkdir()
        for f in folder.iterdir():
            if f.name == "model.safetensors":
                save_file({k: v.float() for k, v in load_file(f).items()}, dst / f.name)
            else:
                (dst / f.name).write_bytes(f.read_bytes())
    paths = [upcast / str(i) for i in range(len(halves))]
    merge_to_disk(
        paths[0], paths[1:], weights, tmp_path / "ref", method=method, dtype=torch.bfloat16
    )
    got = load_file(tmp_path / "from-bf16" / "model.safetensors")
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    for name, value in ref.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)
