"""The disk merge's numpy weighted sum: dtype conversions bit for bit against torch, chunking,
page release, output dtypes, mixed input dtypes, and that it never imports torch."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from demix.config import ArchitectureConfig
from demix.errors import ModelError
from demix.merge import merge_to_disk
from demix.merge.disk import WeightedSum, bf16_bits_to_float32, float32_to_bf16_bits
from demix.model import build_tiny_llama
from demix.safetensors_io import MappedSafetensors

ARCH = ArchitectureConfig(
    hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
)
WEIGHTS = [0.2, 0.5, 0.3]


def _bf16_bits(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_fp32_to_bf16_rounds_like_torch():
    gen = np.random.default_rng(0)
    patterns = [
        0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # zeros, infinities
        0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000,  # largest finite; rounds up to inf
        0x00000001, 0x00008000, 0x00018000, 0x807FFFFF,  # subnormals, ties
        0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001,  # ties to even, either side
        0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FFFFFFF,  # NaNs, payloads that would carry
    ]  # fmt: skip
    bits = np.concatenate(
        [np.array(patterns, np.uint32), gen.integers(0, 2**32, 1 << 20, np.uint32)]
    )
    values = bits.view(np.float32)
    n = len(values)
    got = float32_to_bf16_bits(
        values, np.empty(n, np.uint16), np.empty(n, np.uint32), np.empty(n, np.bool_)
    )
    want = _bf16_bits(torch.from_numpy(values.copy()))
    nan = np.isnan(values)
    assert nan.sum() > 1000  # the random patterns hold NaNs too
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.all(got[nan] == 0x7FC0)


def test_bf16_to_fp32_is_exact_for_every_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = bf16_bits_to_float32(bits, np.empty(len(bits), np.float32))
    want = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def _terms(n: int):
    gen = torch.Generator().manual_seed(1)
    values = [torch.randn(n, generator=gen) for _ in range(4)]
    stored = [
        (values[0].numpy(), "F32"),
        (_bf16_bits(values[1]), "BF16"),
        (values[2].half().numpy(), "F16"),
        (values[3].double().numpy(), "F64"),
    ]
    exact = [
        values[0].double(),
        values[1].bfloat16().double(),
        values[2].half().double(),
        values[3].double(),
    ]
    return stored, exact


@pytest.mark.parametrize("out_dtype", ["F32", "F16", "BF16", "F64"])
def test_weighted_sum_is_independent_of_chunking_and_releases_every_entry(out_dtype):
    n = 1000
    stored, exact = _terms(n)
    coefficients = [0.7, -0.2, 0.4, 0.1]
    terms = [(x, a, d) for (x, d), a in zip(stored, coefficients, strict=True)]
    np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
    released: list[tuple[int, int, int]] = []
    small = WeightedSum(chunk=7, block=21)(
        terms, np.empty(n, np_dtype[out_dtype]), out_dtype, lambda *r: released.append(r)
    )
    large = WeightedSum()(terms, np.empty(n, np_dtype[out_dtype]), out_dtype, lambda *r: None)
    np.testing.assert_array_equal(small, large)
    for k in range(len(terms)):
        spans = sorted((start, stop) for term, start, stop in released if term == k)
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] and b[1] - b[0] <= 21 for a, b in itertools.pairwise(spans))
    reference = sum(a * x for a, x in zip(coefficients, exact, strict=True))
    got = (
        torch.from_numpy(small.view(np.int16)).view(torch.bfloat16)
        if out_dtype == "BF16"
        else torch.from_numpy(small)
    )
    # fp32 accumulation (a few fp32 roundings), then one rounding to the output dtype
    eps = torch.finfo(got.dtype).eps if got.dtype != torch.float64 else 0.0
    torch.testing.assert_close(got.double(), reference, rtol=eps + 1e-6, atol=1e-6)


def _model_with_dtypes(folder, dtypes: list[torch.dtype], seed: int):
    """A tiny Llama whose tensors are stored in the given dtypes, in turn."""
    model = build_tiny_llama(ARCH, 96, 0, seed=0)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: (p.detach() + torch.randn(p.shape, generator=gen) * 0.02).to(dtypes[i % len(dtypes)])
        for i, (name, p) in enumerate(model.named_parameters())
    }
    model.config.save_pretrained(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return tensors


def test_mixed_input_dtypes_merge_as_their_exact_fp32_values(tmp_path):
    """Inputs in different dtypes (per tensor and per model) are read as they are: the merge
    equals, bit for bit, the merge of their fp32 values saved as fp32."""
    folders, upcast = [], []
    for i, dtypes in enumerate(
        [
            [torch.float32],
            [torch.bfloat16, torch.float16],
            [torch.float16, torch.float32],
            [torch.float64, torch.bfloat16],
        ]
    ):
        folder, as_fp32 = tmp_path / f"m{i}", tmp_path / f"fp32-{i}"
        folder.mkdir(), as_fp32.mkdir()
        tensors = _model_with_dtypes(folder, dtypes, seed=i)
        (as_fp32 / "config.json").write_bytes((folder / "config.json").read_bytes())
        save_file({k: v.float() for k, v in tensors.items()}, as_fp32 / "model.safetensors")
        folders.append(folder)
        upcast.append(as_fp32)
    for method in ("linear", "task_arithmetic"):
        merge_to_disk(folders[0], folders[1:], WEIGHTS, tmp_path / method, method, "float32")
        merge_to_disk(upcast[0], upcast[1:], WEIGHTS, tmp_path / f"{method}-ref", method)
        got = load_file(tmp_path / method / "model.safetensors")
        ref = load_file(tmp_path / f"{method}-ref" / "model.safetensors")
        for name, value in ref.items():
            assert torch.equal(got[name], value), (method, name)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_output_dtype_is_the_fp32_merge_rounded_as_torch_rounds(tmp_path, dtype):
    folders = []
    for i in range(4):
        folders.append(tmp_path / f"m{i}")
        folders[-1].mkdir()
        _model_with_dtypes(folders[-1], [torch.float32], seed=i)
    merge_to_disk(folders[0], folders[1:], WEIGHTS, tmp_path / "fp32")
    merge_to_disk(folders[0], folders[1:], WEIGHTS, tmp_path / dtype, dtype=dtype)
    fp32 = load_file(tmp_path / "fp32" / "model.safetensors")
    got = load_file(tmp_path / dtype / "model.safetensors")
    for name, value in fp32.items():
        assert got[name].dtype == getattr(torch, dtype)
        assert torch.equal(got[name], value.to(getattr(torch, dtype))), name


@pytest.mark.parametrize("dtype", ["int8", "complex64", "fp8"])
def test_an_output_dtype_that_is_not_a_float_is_refused_before_writing(tmp_path, dtype):
    folder = tmp_path / "m"
    folder.mkdir()
    _model_with_dtypes(folder, [torch.float32], seed=0)
    with pytest.raises(ModelError, match=f"merge output dtype {dtype}: expected one of"):
        merge_to_disk(folder, [folder], [1.0], tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()


def test_the_weighted_sum_merge_does_not_import_torch(tmp_path):
    """Linear and task arithmetic run on numpy (torch's import costs more than the merge)."""
    folders = []
    for i in range(3):
        folders.append(tmp_path / f"m{i}")
        folders[-1].mkdir()
        _model_with_dtypes(folders[-1], [torch.float32, torch.bfloat16], seed=i)
    code = (
        "import sys\n"
        "from demix.merge import merge_to_disk\n"
        f"f = {[str(f) for f in folders]!r}\n"
        f"merge_to_disk(f[0], f[1:], [0.5, 0.5], {str(tmp_path / 'a')!r}, dtype='bfloat16')\n"
        f"merge_to_disk(f[0], f[1:], [0.7, 0.6], {str(tmp_path / 'b')!r}, 'task_arithmetic')\n"
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "b" / "manifest.json").is_file()


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):  # noqa: SIM115 (read to the end at once)
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_released_input_pages_stay_released_while_the_sum_reads_on(tmp_path):
    """Memory of a streaming merge does not grow with the bytes read: every block's pages are
    dropped once summed, including the ones the kernel maps again around the next read."""
    n, names = 1 << 22, ["a", "b", "c", "d"]  # four 16 MiB tensors per file, back to back
    files, values = [], []
    for i in range(2):
        files.append(tmp_path / f"m{i}.safetensors")
        gen = torch.Generator().manual_seed(i)
        values.append({name: torch.randn(n, generator=gen) for name in names})
        save_file(values[-1], files[-1])
    mapped = [MappedSafetensors(f) for f in files]
    weighted_sum = WeightedSum(block=1 << 14)  # 64 KiB blocks: many block boundaries
    out = np.empty(n, np.float32)
    for name in names:
        terms = [(m.array(name).reshape(-1), 0.5, "F32") for m in mapped]

        def release(k: int, start: int, stop: int, name: str = name) -> None:
            mapped[k].release(name, start, stop)

        weighted_sum(terms, out, "F32", release)
        np.testing.assert_array_equal(out, (0.5 * values[0][name] + 0.5 * values[1][name]).numpy())
    # 128 MiB read; what stays mapped is a few pages around the last read of each file
    assert sum(_resident_kib(f) for f in files) < 4 * 1024
