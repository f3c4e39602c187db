"""The merge's own safetensors reader and streaming writer against the safetensors library."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from demix.errors import ModelError
from demix.safetensors_io import (
    NUMPY_DTYPES,
    MappedSafetensors,
    SafetensorsStreamWriter,
    dtype_name,
    torch_dtype,
)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "bf16": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(3, generator=gen).to(torch.float16),
        "i64": torch.arange(6, dtype=torch.int64).view(2, 3),
        "flags": torch.tensor([True, False, True]),
        "u8": torch.arange(5, dtype=torch.uint8),
    }
    for i in range(4):
        out[f"layer{i}.weight"] = torch.randn(16, 8, generator=gen)
    return out


def test_reader_matches_the_safetensors_library_for_every_dtype(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path)
    mapped = MappedSafetensors(path)
    expected = load_file(path)
    assert sorted(mapped.names()) == sorted(expected)
    for name, value in expected.items():
        got = mapped.tensor(name)
        assert got.dtype == value.dtype and got.shape == value.shape
        assert torch.equal(got, value), name
    assert {torch_dtype(n) for n in NUMPY_DTYPES} >= {t.dtype for t in expected.values()}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """What the reader's numpy view holds for a tensor: bf16 as its uint16 bit patterns."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def test_numpy_views_hold_the_same_bytes_as_torch_views(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = _tensors()
    save_file(tensors, path)
    mapped = MappedSafetensors(path)
    for name, value in tensors.items():
        got = mapped.array(name)
        assert (
            got.shape == tuple(value.shape) and got.dtype == NUMPY_DTYPES[dtype_name(value.dtype)]
        )
        np.testing.assert_array_equal(got, _as_numpy(value))


def test_writer_given_numpy_arrays_writes_the_same_file_as_given_torch_tensors(tmp_path):
    tensors = _tensors()
    (tmp_path / "torch").mkdir(), (tmp_path / "numpy").mkdir()
    from_torch = _write(tmp_path / "torch", tensors, shard_bytes=1 << 30)
    plan = [(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in tensors.items()]
    writer = SafetensorsStreamWriter(tmp_path / "numpy", plan, 1 << 30)
    for name, value in tensors.items():
        writer.write(name, _as_numpy(value))
    assert writer.finish() == from_torch
    assert (tmp_path / "numpy" / "model.safetensors").read_bytes() == (
        tmp_path / "torch" / "model.safetensors"
    ).read_bytes()


def test_dtype_names():
    assert [dtype_name(d) for d in (torch.bfloat16, "bfloat16", np.uint16, "F16", np.float32)] == [
        "BF16",
        "BF16",
        "BF16",
        "F16",
        "F32",
    ]
    for name in NUMPY_DTYPES:
        assert dtype_name(torch_dtype(name)) == name
    for bad in (torch.uint16, torch.complex64, "fp8", np.complex64):
        with pytest.raises(ValueError, match="cannot be stored"):
            dtype_name(bad)


def test_released_views_read_the_same_values_again(tmp_path):
    path = tmp_path / "m.safetensors"
    big = torch.randn(300_000)  # several pages
    save_file({"big": big}, path)
    mapped = MappedSafetensors(path)
    view = mapped.tensor("big")
    before = view.clone()
    mapped.release("big")
    assert torch.equal(view, before) and torch.equal(mapped.tensor("big"), big)


def _write(folder, tensors, shard_bytes, order=None):
    order = order or list(tensors)
    plan = [(n, tuple(tensors[n].shape), tensors[n].dtype) for n in order]
    writer = SafetensorsStreamWriter(folder, plan, shard_bytes)
    for name in order:
        writer.write(name, tensors[name])
    return writer.finish()


def test_writer_output_is_read_back_by_safetensors_with_the_hashes_it_reports(tmp_path):
    tensors = _tensors()
    hashes = _write(tmp_path, tensors, shard_bytes=1 << 30)
    assert list(hashes) == ["model.safetensors"]
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    assert hashes["model.safetensors"] == {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (header_len,) = struct.unpack("<Q", data[:8])
    assert (8 + header_len) % 8 == 0
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value), name
    with safe_open(path, framework="pt") as st:
        assert st.metadata() == {"format": "pt"}
    assert not list(tmp_path.glob(".shard-*"))


def test_writer_cuts_shards_at_the_size_and_writes_the_index(tmp_path):
    tensors = {f"w{i}": torch.full((64,), float(i)) for i in range(5)}  # 256 bytes each
    hashes = _write(tmp_path, tensors, shard_bytes=600)  # two per shard
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert list(hashes) == names
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 256
    assert index["weight_map"] == {
        "w0": names[0],
        "w1": names[0],
        "w2": names[1],
        "w3": names[1],
        "w4": names[2],
    }
    for name, info in hashes.items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == info["sha256"]
        for tensor, value in load_file(tmp_path / name).items():
            assert index["weight_map"][tensor] == name and torch.equal(value, tensors[tensor])


def test_writer_refuses_writes_off_the_plan(tmp_path):
    tensors = {"a": torch.zeros(2), "b": torch.zeros(3)}
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = SafetensorsStreamWriter(tmp_path, plan, 1 << 20)
    with pytest.raises(ValueError, match="does not follow the plan"):
        writer.write("b", tensors["b"])
    with pytest.raises(ValueError, match="does not follow the plan"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    writer.write("a", tensors["a"])
    with pytest.raises(ValueError, match="1 planned tensors were not written"):
        writer.finish()


def _corrupt(tmp_path, payload: bytes):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(payload)
    return path


def _header(entries: dict) -> bytes:
    text = json.dumps(entries).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "not a readable safetensors file"),
        (b"\x00" * 7, "not a readable safetensors file"),
        (struct.pack("<Q", 1 << 40) + b"{}", "not a readable safetensors file"),
        (struct.pack("<Q", 4) + b"nope", "not a readable safetensors file"),
        (_header([1, 2]), "not a JSON object"),
        (
            _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\0" * 8,
            "offsets outside the file",
        ),
        (
            _header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}) + b"\0" * 16,
            "offsets outside the file",
        ),
        (
            _header({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}),
            "offsets outside the file",
        ),
        (
            _header({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4,
            "unsupported or malformed",
        ),
    ],
)
def test_bad_files_are_one_line_model_errors(tmp_path, payload, message):
    path = _corrupt(tmp_path, payload)
    with pytest.raises(ModelError, match=message) as err:
        MappedSafetensors(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(
    "entries",
    [
        # the safetensors library: "invalid type: map, expected a sequence"
        {"t0": {"dtype": "F64", "shape": {}, "data_offsets": [0, 8]}},
        {"t0": {"dtype": "F64", "shape": [1.0], "data_offsets": [0, 8]}},
        {"t0": {"dtype": "F64", "shape": [1], "data_offsets": {"0": 0, "1": 8}}},
        {"t0": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8, 8]}},
        {"t0": {"dtype": "F64", "shape": [2**64, 0], "data_offsets": [0, 0]}},
        {"t0": {"dtype": "F64", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}},
        {"t0": {"dtype": ["F64"], "shape": [1], "data_offsets": [0, 8]}},
        {"t0": {"dtype": "F64", "shape": [1]}},
        {"t0": None},
        {"__metadata__": {"a": 1}, "t0": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}},
    ],
    ids=str,
)
def test_headers_the_library_refuses_are_refused(tmp_path, entries):
    """Every header field's type is checked, as the safetensors library checks it."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = _corrupt(tmp_path, _header(entries) + b"\0" * 8)
    with pytest.raises(SafetensorError):
        load_file(path)
    with pytest.raises(ModelError) as err:
        MappedSafetensors(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_duplicate_header_key_is_refused(tmp_path):
    text = b'{"t0": {"dtype": "F64", "dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}'
    path = _corrupt(tmp_path, struct.pack("<Q", len(text)) + text + b"\0" * 8)
    with pytest.raises(ModelError, match="duplicate key 'dtype'"):
        MappedSafetensors(path)
