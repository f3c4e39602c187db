"""Merge methods against mergekit (the reference for their semantics) on tiny real models.

Linear and task arithmetic agree within 1e-6 in fp32, TIES exactly up to fp32 rounding, DARE in
distribution (different generators: see demix/merge/dare.py). Both demix engines (disk merge and
in-memory DeltaStack) agree with each other for every method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import LlamaConfig, LlamaForCausalLM

from demix.checkpoint import TensorIndex
from demix.config import MERGE_METHOD_PARAMETERS, ArchitectureConfig, parse_config
from demix.errors import ConfigError, MixtureError, ModelError
from demix.merge import METHODS, DeltaStack, make_method, merge_to_disk
from demix.merge.methods import method_parameters
from demix.merge.methods.base import tensor_generator
from demix.merge.methods.ties import trim_to_density
from demix.model import build_tiny_llama, load_model
from tests.conftest import smoke_config_dict

mergekit_config = pytest.importorskip("mergekit.config")
mergekit_merge = pytest.importorskip("mergekit.merge")

ARCH = ArchitectureConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
)
WEIGHTS = [0.2, 0.5, 0.3]


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def _family(root, make) -> tuple:
    """Base and three components (base + independent noise) made by `make()`, saved under root."""
    make().save_pretrained(root / "base")
    comps = []
    for k in range(3):
        _perturb(make(), seed=10 + k).save_pretrained(root / f"c{k}")
        comps.append(root / f"c{k}")
    return root / "base", comps


def _with_biases() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


FAMILIES = {
    "tied": lambda: build_tiny_llama(ARCH, 96, 0, seed=0),
    "untied": lambda: build_tiny_llama(
        ARCH.model_copy(update={"tie_word_embeddings": False}), 96, 0, seed=0
    ),
    "biases": _with_biases,
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return _family(root, FAMILIES[request.param])


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("tied-only"), FAMILIES["tied"])


def _params(folder) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in load_model(folder).named_parameters()}


def _mergekit(base, comps, weights, out, method: str, seed: int | None = None, **parameters):
    """Run mergekit's Python API with demix's parameter names mapped to mergekit's."""
    per_model = {"weight": None}
    if "density" in parameters:
        per_model["density"] = parameters.pop("density")
    if "drop_rate" in parameters:
        per_model["density"] = 1.0 - parameters.pop("drop_rate")
    shared = {"lambda": parameters.pop("scale")} if "scale" in parameters else {}
    if method == "linear":
        shared = {"normalize": False}
    config = {
        "merge_method": method,
        "dtype": "float32",
        "models": [
            {"model": str(c), "parameters": {**per_model, "weight": float(w)}}
            for c, w in zip(comps, weights, strict=True)
        ],
        "parameters": shared,
    }
    if method != "linear":
        config["base_model"] = str(base)
    mergekit_merge.run_merge(
        mergekit_config.MergeConfiguration.model_validate(config),
        str(out),
        mergekit_merge.MergeOptions(
            copy_tokenizer=False, quiet=True, write_model_card=False, random_seed=seed
        ),
    )
    return _tensors(out)


def _tensors(folder) -> dict[str, torch.Tensor]:
    """The tensors saved in a model folder, as written (no model class in between)."""
    tensors = {}
    for name in TensorIndex(folder).names():
        tensors[name] = TensorIndex(folder).get(name)
    return tensors


def _demix(base, comps, weights, out, method: str, **parameters):
    merge_to_disk(base, comps, weights, out, method=make_method(method, **parameters))
    return _tensors(out)


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("linear", {}),
        ("task_arithmetic", {}),
        ("task_arithmetic", {"scale": 0.6}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 1.0, "scale": 0.8}),
    ],
)
def test_deterministic_methods_equal_mergekit(family, tmp_path, method, parameters):
    base, comps = family
    weights = [-0.3, 0.8, 0.5] if method != "ties" else WEIGHTS
    merge_to_disk(
        base, comps, weights, tmp_path / "demix", method=make_method(method, **parameters)
    )
    ours = _tensors(tmp_path / "demix")
    theirs = _mergekit(base, comps, weights, tmp_path / "mk", method, **dict(parameters))
    # mergekit's Llama definition has no bias tensors and silently leaves them out of its output;
    # demix merges every tensor of the checkpoint (its biases are checked against the formula).
    biases = sorted(set(ours) - set(theirs))
    assert all(name.endswith(".bias") for name in biases)
    assert not set(theirs) - set(ours)
    assert max(float((ours[n] - theirs[n]).abs().max()) for n in theirs) <= 1e-6
    if method == "linear" and biases:
        cs = [_tensors(c) for c in comps]
        for name in biases:
            expected = sum(w * c[name] for w, c in zip(weights, cs, strict=True))
            torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6)
        assert len(biases) == 2 * 7  # q, k, v, o, gate, up, down per layer


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_mergekit_in_distribution(tied, tmp_path, method):
    base, comps = tied
    drop = 0.6
    ours = _demix(base, comps, WEIGHTS, tmp_path / "demix", method, drop_rate=drop, seed=3)
    theirs = _mergekit(base, comps, WEIGHTS, tmp_path / "mk", method, seed=3, drop_rate=drop)
    b = _tensors(base)
    d_ours = torch.cat([(ours[n] - b[n]).flatten() for n in b]).numpy()
    d_theirs = torch.cat([(theirs[n] - b[n]).flatten() for n in b]).numpy()
    assert not np.allclose(d_ours, d_theirs)  # different masks...
    # ...same law: an entry stays at the base only when every component dropped it (drop^3)
    n = d_ours.size
    for d in (d_ours, d_theirs):
        untouched = float(np.mean(d == 0))
        assert abs(untouched - drop**3) < 4 * np.sqrt(drop**3 * (1 - drop**3) / n)
    # and the merged deltas have the same distribution (two-sample Kolmogorov-Smirnov)
    assert stats.ks_2samp(d_ours, d_theirs).pvalue > 1e-3


def test_dare_keeps_the_expected_delta_and_is_seeded():
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    method = make_method("dare_linear", drop_rate=0.7, seed=1)
    dropped = method.prepare(delta.clone(), 0, "w")
    kept = dropped != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.005
    torch.testing.assert_close(dropped[kept], delta[kept] / 0.3)
    torch.testing.assert_close(method.prepare(delta.clone(), 0, "w"), dropped, rtol=0, atol=0)
    assert not torch.equal(method.prepare(delta.clone(), 1, "w"), dropped)
    assert not torch.equal(method.prepare(delta.clone(), 0, "v"), dropped)
    other_seed = make_method("dare_linear", drop_rate=0.7, seed=2)
    assert not torch.equal(other_seed.prepare(delta.clone(), 0, "w"), dropped)
    # no drop, no change
    torch.testing.assert_close(
        make_method("dare_linear", drop_rate=0.0).prepare(delta, 0, "w"), delta
    )
    # generators depend only on (seed, component, tensor)
    a = torch.rand(4, generator=tensor_generator(5, 2, "x"))
    assert torch.equal(a, torch.rand(4, generator=tensor_generator(5, 2, "x")))


def test_trim_keeps_the_largest_magnitudes():
    delta = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2, 0.0, 1.0, -0.05, 0.3, 0.7])
    torch.testing.assert_close(
        trim_to_density(delta.clone(), 0.3),
        torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
    )
    assert int((trim_to_density(delta.clone(), 0.01) != 0).sum()) == 1  # at least one kept


def test_ties_hand_computed():
    """Sign election and weighted disjoint mean on three 4-entry deltas."""
    deltas = torch.tensor([[1.0, -2.0, 3.0, 0.0], [2.0, 1.0, -1.0, 0.0], [-4.0, 1.0, -1.0, 0.0]])
    weights = torch.tensor([0.5, 0.25, 0.25])
    out = torch.empty(4)
    make_method("ties", density=1.0).combine(deltas, weights, out)
    # entry 0: weighted 0.5, 0.5, -1.0 -> sum 0 -> elected + -> (0.5 + 0.5) / 0.75
    # entry 1: -1.0, 0.25, 0.25 -> - -> -1.0 / 0.5; entry 2: 1.5, -0.25, -0.25 -> + -> 1.5 / 0.5
    # entry 3: nothing agrees -> 0
    torch.testing.assert_close(out, torch.tensor([1.0 / 0.75, -2.0, 3.0, 0.0]))
    make_method("dare_ties", drop_rate=0.0, scale=2.0).combine(deltas, weights, out)
    torch.testing.assert_close(out, 2 * torch.tensor([1.0, -1.0, 1.5, 0.0]))


@pytest.mark.parametrize(
    ("method", "parameters"),
    [
        ("linear", {}),
        ("task_arithmetic", {"scale": 0.5}),
        ("ties", {"density": 0.4}),
        ("dare_linear", {"drop_rate": 0.5, "seed": 7}),
        ("dare_ties", {"drop_rate": 0.3, "seed": 7}),
    ],
)
def test_in_memory_proxies_equal_the_disk_merge(tied, tmp_path, method, parameters):
    base, comps = tied
    merge = make_method(method, **parameters)
    model = load_model(base)
    stack = DeltaStack(model, base, comps, merge, chunk=1000)  # several chunks per tensor
    ptrs = [p.data_ptr() for p in model.parameters()]
    for weights in (WEIGHTS, [0.6, 0.1, 0.3]):
        stack.write(weights)
        merge_to_disk(base, comps, weights, tmp_path / "disk", method=merge)
        disk = _params(tmp_path / "disk")
        for name, value in model.named_parameters():
            torch.testing.assert_close(value.detach(), disk[name], rtol=0, atol=1e-6)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_bfloat16_deltas_stay_close(tied, method):
    base, comps = tied
    full, half = load_model(base), load_model(base)
    DeltaStack(full, base, comps, method).write(WEIGHTS)
    stack = DeltaStack(half, base, comps, method, delta_dtype=torch.bfloat16)
    assert stack.deltas.dtype == torch.bfloat16
    stack.write(WEIGHTS)
    b = _params(base)
    for (name, p), q in zip(full.named_parameters(), half.parameters(), strict=True):
        p, q = p.detach(), q.detach()
        assert q.dtype == torch.float32
        # bf16 keeps 8 bits of mantissa: error well under 1% of the delta's magnitude
        delta = (p - b[name]).abs().max()
        assert float((p - q).abs().max()) <= 0.01 * float(delta) + 1e-7


def test_weights_that_do_not_fit_the_method_are_refused(tied, tmp_path):
    base, comps = tied
    cases = [
        ("linear", {}, [0.5, 0.5, 0.5], "sum to 1"),
        ("ties", {"density": 0.5}, [-0.2, 0.6, 0.6], "non-negative"),
        ("dare_ties", {}, [0.0, 0.0, 0.0], "non-negative"),
        ("task_arithmetic", {}, [float("nan"), 0.5, 0.5], "NaN"),
        ("task_arithmetic", {}, [0.5, 0.5], "2 merge weights for 3 components"),
    ]
    for method, parameters, weights, message in cases:
        with pytest.raises(MixtureError, match=message):
            merge_to_disk(
                base, comps, weights, tmp_path / "out", method=make_method(method, **parameters)
            )
        assert not (tmp_path / "out").exists()
    stack = DeltaStack(load_model(base), base, comps, "ties")
    with pytest.raises(MixtureError, match="non-negative"):
        stack.write([-0.2, 0.6, 0.6])


def test_bad_method_parameters_are_refused():
    with pytest.raises(MixtureError, match="unknown merge method"):
        make_method("slerp")
    with pytest.raises(MixtureError, match="takes"):
        make_method("linear", density=0.5)
    with pytest.raises(MixtureError, match="density"):
        make_method("ties", density=0.0)
    with pytest.raises(MixtureError, match="drop_rate"):
        make_method("dare_linear", drop_rate=1.0)


def test_different_tensor_sets_are_refused_by_name(tied, tmp_path):
    base, _ = tied
    FAMILIES["untied"]().save_pretrained(tmp_path / "untied")
    for method in METHODS:
        with pytest.raises(ModelError, match="lm_head.weight"):
            merge_to_disk(base, [tmp_path / "untied"], [1.0], tmp_path / "out", method=method)
    assert not (tmp_path / "out").exists()


def test_config_knows_the_same_methods_and_parameters(corpus_dir):
    assert {name: method_parameters(name) for name in METHODS} == MERGE_METHOD_PARAMETERS
    raw = smoke_config_dict(corpus_dir)

    def merge_section(**merge):
        return parse_config({**raw, "merge": merge}).merge

    assert merge_section(method="ties", weights="component", density=0.3).parameters == {
        "density": 0.3
    }
    with pytest.raises(ConfigError, match="merge.density does not apply to method 'linear'"):
        merge_section(density=0.3)
    with pytest.raises(ConfigError, match="merge.density"):
        merge_section(method="ties", weights="component", density=1.5)
    with pytest.raises(ConfigError, match="can be negative"):
        merge_section(method="ties", weights="data")
    # a config survives the YAML round trip the pipeline components do (unset parameters stay unset)
    from demix.config import config_yaml, resolve_config

    config = parse_config({**raw, "merge": {"method": "dare_linear", "drop_rate": 0.2}})
    assert resolve_config(config_yaml(config)).merge == config.merge


def test_the_output_dtype_is_not_a_scoring_setting(corpus_dir):
    """Scores of merged proxies do not depend on the dtype a merged model is saved in, so a
    search resumed with another merge.output_dtype keeps its scores; other settings do not."""
    from demix.proxies import merge_settings

    raw = smoke_config_dict(corpus_dir)

    def settings(**merge):
        return merge_settings(parse_config({**raw, "merge": merge}).merge)

    assert settings(output_dtype="bfloat16") == settings() == settings(output_dtype="float16")
    assert settings(shard_bytes=1000) == settings()
    assert settings(delta_device="host") == settings() == settings(delta_device="device")
    assert settings(delta_dtype="bfloat16") != settings()
    assert settings(method="task_arithmetic") != settings()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_cuda_proxies_equal_cpu(tied, method):
    base, comps = tied
    cpu, gpu = load_model(base), load_model(base, "cuda")
    DeltaStack(cpu, base, comps, method).write(WEIGHTS)
    DeltaStack(gpu, base, comps, method).write(WEIGHTS)
    for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach().cpu(), rtol=0, atol=1e-5)
