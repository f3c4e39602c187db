"""Host-resident deltas and the memory plan.

Host mode (the base and the deltas in host memory, each proxy streamed to the device chunk by
chunk through two staging slots) runs the same code on the CPU as on CUDA, the "device" being a
separate CPU buffer: it must give the device mode's proxy bit for bit, for every method.
"""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch

import demix.merge.delta_stack as delta_stack
from demix.config import ArchitectureConfig, parse_config
from demix.errors import ModelError
from demix.merge import DeltaStack, make_method
from demix.merge.delta_stack import chunk_slices
from demix.merge.plan import (
    EVAL_RESERVE,
    Bandwidths,
    measure_bandwidths,
    memory_plan,
    parameter_count,
    plan_for,
)
from demix.model import build_tiny_llama, load_model
from demix.storage import write_manifest
from tests.conftest import smoke_config_dict

# untied, with biases absent: embeddings 96 x 32, attention 32 x 32, MLP 64 x 32, norms 32
ARCH = ArchitectureConfig(
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
CHUNK = 997  # prime: divides neither the parameter count nor any tensor's size
METHODS = {
    "linear": {},
    "task_arithmetic": {"scale": 0.7},
    "ties": {"density": 0.4},
    "dare_linear": {"drop_rate": 0.3, "seed": 3},
    "dare_ties": {"drop_rate": 0.3, "seed": 3},
}
WEIGHTS = ([0.2, 0.5, 0.3], [0.6, 0.1, 0.3])
GB = 1e9


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("host")
    build_tiny_llama(ARCH, 96, 0, seed=0).save_pretrained(root / "base")
    comps = []
    for k in range(3):
        model = build_tiny_llama(ARCH, 96, 0, seed=0)
        gen = torch.Generator().manual_seed(20 + k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        model.save_pretrained(root / f"c{k}")
        comps.append(root / f"c{k}")
    return root / "base", comps


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _stack(family, method: str, where: str) -> DeltaStack:
    base, comps = family
    merge = make_method(method, **METHODS[method])
    return DeltaStack(load_model(base), base, comps, merge, chunk=CHUNK, delta_device=where)


def test_chunks_cover_every_entry_once():
    for total, chunk in ((10_000, 997), (997, 997), (5, 997), (1994, 997)):
        covered = [i for part in chunk_slices(total, chunk) for i in range(part.start, part.stop)]
        assert covered == list(range(total))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_host_mode_equals_device_mode_bit_for_bit(family, method):
    device, host = _stack(family, method, "device"), _stack(family, method, "host")
    assert host.delta_device == "host" and host.deltas.device.type == "cpu"
    total = host.flat.numel()
    assert total % CHUNK and len(chunk_slices(total, CHUNK)) > 10
    assert len({p.shape for p in host.model.parameters()}) >= 4
    for weights in WEIGHTS:
        device.write(weights)
        host.write(weights)
        expected, got = _state(device.model), _state(host.model)
        assert list(got) == list(expected)
        for name, value in got.items():
            assert torch.equal(value, expected[name]), (method, name)


@pytest.mark.parametrize("fault", ["skipped", "misplaced"])
def test_the_comparison_catches_a_chunk_skipped_or_misplaced(family, monkeypatch, fault):
    """A host build that leaves out one chunk, or writes one chunk one entry off, differs from
    the device build: the bit-for-bit comparison above would fail."""
    device, host = _stack(family, "linear", "device"), _stack(family, "linear", "host")
    device.write(WEIGHTS[0])
    host.write(WEIGHTS[1])  # what a skipped chunk keeps: the previous proxy
    expected = device.flat.clone()
    honest = chunk_slices

    def faulty(total: int, chunk: int) -> list[slice]:
        parts = honest(total, chunk)
        middle = parts[len(parts) // 2]
        if fault == "skipped":
            return parts[: len(parts) // 2] + parts[len(parts) // 2 + 1 :]
        parts[len(parts) // 2] = slice(middle.start + 1, middle.stop + 1)
        return parts

    monkeypatch.setattr(delta_stack, "chunk_slices", faulty)
    host.write(WEIGHTS[0])
    differ = (host.flat != expected).nonzero().flatten()
    assert len(differ) > 0
    middle = honest(host.flat.numel(), CHUNK)[len(honest(host.flat.numel(), CHUNK)) // 2]
    assert middle.start <= int(differ.min()) and int(differ.max()) <= middle.stop


def test_host_mode_with_bfloat16_deltas(family):
    base, comps = family
    stacks = [
        DeltaStack(load_model(base), base, comps, delta_dtype=torch.bfloat16, delta_device=where)
        for where in ("device", "host")
    ]
    for stack in stacks:
        stack.write(WEIGHTS[0])
    assert stacks[1].deltas.dtype == torch.bfloat16
    assert torch.equal(stacks[0].flat, stacks[1].flat)


# ------------------------------------------------------------------------------- memory plan

FAST = Bandwidths(3.0e12, 5.0e10, "measured")


def test_a_7b_model_goes_to_pinned_host_memory_on_an_80gb_gpu():
    plan = memory_plan(
        7_000_000_000, "float32", 7, "linear", "bfloat16", "cuda:0",
        free_bytes=80 * GB, host_free_bytes=400 * GB, bandwidths=FAST,
    )  # fmt: skip
    assert plan.delta_device == "host"
    assert plan.host_bytes == 28 * GB + 7 * 14 * GB
    assert plan.device_bytes == 2 * 28 * GB  # model + proxy buffer while re-pointing
    assert plan.seconds_per_build == pytest.approx(126 * GB / 5.0e10)
    assert plan.line == (
        "merge memory plan: base 28.0 GB float32 and 7 deltas x 14.0 GB bfloat16 in pinned host "
        "memory (126.0 GB of 400.0 GB available), proxy 28.0 GB on cuda:0 (56.0 GB of 80.0 GB "
        "free); about 2.5 s per proxy build at 50 GB/s host-to-device (measured)"
    )


def test_a_small_model_stays_on_the_device():
    plan = memory_plan(
        500_000_000, "float32", 7, "ties", "float32", "cuda:0",
        free_bytes=80 * GB, host_free_bytes=400 * GB,
    )  # fmt: skip
    assert plan.delta_device == "device" and plan.host_bytes == 0
    assert plan.device_bytes > (2 + 7) * 2 * GB  # plus the sign election's scratch
    assert "on cuda:0 beside the proxy" in plan.line
    assert "at least" in plan.line and "(default)" in plan.line  # ties: the floor; defaults


def test_nothing_fits_one_line_naming_what_would():
    with pytest.raises(ModelError) as err:
        memory_plan(
            7_000_000_000, "float32", 7, "linear", "float32", "cuda:0",
            free_bytes=80 * GB, host_free_bytes=150 * GB,
        )  # fmt: skip
    message = str(err.value)
    assert "\n" not in message
    assert "merge.delta_dtype: bfloat16" in message  # 28 + 98 GB in host memory fits in 135
    assert "at most 3 components" in message  # 28 + 3 x 28 = 112 GB fits
    assert "a device with" in message and "of available host memory" in message
    with pytest.raises(ModelError, match=r"merge.delta_device: host \(or auto\)"):
        memory_plan(
            7_000_000_000, "float32", 7, "linear", "bfloat16", "cuda:0",
            free_bytes=80 * GB, host_free_bytes=400 * GB, delta_device="device",
        )  # fmt: skip


def test_on_a_cpu_host_mode_shares_the_one_memory():
    fits = dict(n_params=10**9, param_dtype="float32", k=3, device="cpu")
    device_mode = 2 * 4 * GB + 3 * 4 * GB
    plan = memory_plan(**fits, free_bytes=int(device_mode / (1 - EVAL_RESERVE)) + 1)
    assert plan.delta_device == "device"
    assert memory_plan(**fits, delta_device="host", free_bytes=40 * GB).delta_device == "host"
    with pytest.raises(ModelError):  # host mode needs the proxy, the base and the deltas too
        memory_plan(**fits, delta_device="host", free_bytes=int(device_mode))


def test_plan_for_reads_headers_only(family, monkeypatch):
    base, comps = family
    n = sum(p.numel() for p in load_model(base).parameters())
    from demix.safetensors_io import MappedSafetensors

    def no_weights(*args, **kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(MappedSafetensors, "tensor", no_weights)
    monkeypatch.setattr(MappedSafetensors, "array", no_weights)
    assert parameter_count(base) == n
    plan = plan_for(base, len(comps), "linear", torch.float32, "float32", "cpu")
    assert plan.delta_device == "device" and plan.bandwidths.source == "measured"
    assert plan.proxy_bytes == 4 * n


def test_bandwidth_measurement_is_quick():
    import time

    start = time.perf_counter()
    measured = measure_bandwidths("cpu")
    assert time.perf_counter() - start < 0.5
    assert measured.device > 1e8 and measured.host_to_device > 1e8


def _evaluator_inputs(family, corpus_dir, tmp_path, **merge):
    base, comps = family
    raw = smoke_config_dict(corpus_dir)
    config = parse_config({**raw, "merge": merge, "train": {**raw["train"], "device": "cpu"}})
    root = tmp_path / "data"
    root.mkdir()
    write_manifest(root, kind="demix.data")
    data = types.SimpleNamespace(names=["general", "code", "math"], root=root)
    components = dict(zip(data.names, comps, strict=True))
    evaluator = types.SimpleNamespace(evaluate=lambda model: {"ok": 1})
    return config, data, base, components, evaluator


def test_the_proxy_evaluator_logs_its_plan_and_follows_it(family, corpus_dir, tmp_path, caplog):
    from demix.stages.proxies import ProxyEvaluator

    inputs = _evaluator_inputs(family, corpus_dir, tmp_path, delta_device="host")
    with caplog.at_level(logging.INFO, logger="demix"):
        proxies = ProxyEvaluator(*inputs)
    lines = [r.getMessage() for r in caplog.records if "merge memory plan" in r.getMessage()]
    assert len(lines) == 1 and "in host memory" in lines[0]
    assert proxies.stack.delta_device == "host"
    assert proxies(np.array([0.4, 0.3, 0.3])) == {"ok": 1}


def test_the_proxy_evaluator_refuses_before_loading_weights(
    family, corpus_dir, tmp_path, monkeypatch
):
    import demix.device_memory as device_memory
    import demix.evaluate.models as models
    import demix.stages.proxies as proxies

    monkeypatch.setattr(device_memory, "free_memory", lambda device: (10**4, 10**4))
    monkeypatch.setattr(models, "load_for_eval", lambda *a: pytest.fail("weights loaded"))
    with pytest.raises(ModelError, match="would fit: .*a device with"):
        proxies.ProxyEvaluator(*_evaluator_inputs(family, corpus_dir, tmp_path))


def _with_eval_dtype(config, dtype: str):
    return config.model_copy(
        update={"evaluate": config.evaluate.model_copy(update={"dtype": dtype})}
    )


def test_the_evaluation_dtype_sets_the_proxy_and_its_key(family, corpus_dir, tmp_path):
    from demix.evaluate.models import eval_dtype
    from demix.proxies import score_key
    from demix.stages.proxies import ProxyEvaluator

    config, data, base, components, evaluator = _evaluator_inputs(family, corpus_dir, tmp_path)
    assert config.evaluate.dtype == "auto"
    assert eval_dtype(config.evaluate, "cpu") == torch.float32
    assert eval_dtype(config.evaluate, "cuda") == torch.bfloat16
    fp32, bf16 = _with_eval_dtype(config, "float32"), _with_eval_dtype(config, "bfloat16")
    # float32 keys are those of before the setting; scores in another dtype never mix with them
    assert score_key(config.evaluate, data, base, device="cpu") == score_key(
        fp32.evaluate, data, base, device="cpu"
    )
    assert score_key(bf16.evaluate, data, base, device="cpu") != score_key(
        fp32.evaluate, data, base, device="cpu"
    )
    mixture = np.array([0.4, 0.3, 0.3])
    merged = {}
    for dtype, settings in (("fp32", fp32), ("bf16", bf16)):
        proxy = ProxyEvaluator(settings, data, base, components, evaluator)
        proxy(mixture)
        merged[dtype] = dict(proxy.model.named_parameters())
    assert {p.dtype for p in merged["bf16"].values()} == {torch.bfloat16}
    for name, value in merged["fp32"].items():
        torch.testing.assert_close(merged["bf16"][name].float(), value, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_host_mode_equals_the_cpu(family, method):
    """On CUDA the chunks are copied from page-locked memory on a side stream while the previous
    chunk is merged: the proxy equals the CPU's (rounding apart), again after a second write."""
    base, comps = family
    merge = make_method(method, **METHODS[method])
    cpu = _stack(family, method, "device")
    gpu = DeltaStack(load_model(base, "cuda"), base, comps, merge, chunk=CHUNK, delta_device="host")
    assert gpu.deltas.is_pinned() and gpu.flat.is_cuda
    for weights in WEIGHTS:
        cpu.write(weights)
        gpu.write(weights)
        torch.testing.assert_close(gpu.flat.cpu(), cpu.flat, rtol=0, atol=1e-5)
