"""Property-based fuzzing of every parser of user input: whatever it is given, a parser returns
a value or raises the project's error type (a DemixError, one line), never anything else.

Parsers: JSONL document lines as curation reads and hashes them, mixtures (`--mixture`), run
configs from YAML text, `--set` overrides, safetensors headers (demix's own reader, which must
accept only what the safetensors library loads) and artifact manifests.

`make test` tries QUICK examples per parser, derandomized (the same inputs every run);
`make test-reliability` sets DEMIX_FUZZ=long and tries LONG fresh ones per parser from one
seed, printed at the end of the run (tests/conftest.py: the Hypothesis profiles). The
reliability table counts the examples tried per parser.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from demix.cli import parse_mixture, parse_overrides
from demix.config import DatasetSpec, RunConfig, parse_config, resolve_config
from demix.data.curate import normalize, read_file_documents
from demix.errors import DemixError
from demix.safetensors_io import NUMPY_DTYPES, MappedSafetensors
from demix.storage import check_manifest_entry, parse_manifest

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability

QUICK, LONG = 60, 1000
PROFILE = os.environ.get("DEMIX_FUZZ", "quick")
if PROFILE not in ("quick", "long"):
    raise ValueError(
        f"DEMIX_FUZZ={PROFILE!r}: use quick (make test) or long (make test-reliability)"
    )
FUZZ = settings(max_examples=LONG if PROFILE == "long" else QUICK)  # the rest: the profile

SCRATCH = Path(tempfile.mkdtemp(prefix="demix-fuzz-"))

# ---------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


# Texts no general strategy reaches by chance: what real files and hostile inputs hold.
adversarial_json = st.one_of(
    st.integers(1, 6000).map(_nested),
    st.integers(1, 6000).map(lambda n: '{"text": ' + _nested(n) + "}"),
    st.integers(1, 6000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(1, 6000).map(lambda n: '{"text": "x", "n": 1' + "0" * n + "}"),
    st.sampled_from(
        [
            '{"text": "\\ud83d lone high surrogate"}',
            '{"text": "lone low \\udc00 surrogate"}',
            '{"text": "pair \\ud83d\\ude00 kept"}',
            '{"text": NaN}',
            '{"text": Infinity}',
            '{"text": "a", "text": 1}',
            '{"text": "\\u0000 nul"}',
            '{"text": "\u2028 line separator"}',
            '"just a string"',
            "[1, 2]",
            "null",
            "\ufeff{}",
            '{"text": "x"} trailing',
        ]
    ),
)


@st.composite
def jsonl_files(draw) -> bytes:
    """The bytes of a JSONL file: records, hostile lines, arbitrary text or bytes."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=300))
    line = st.one_of(
        json_values.map(json.dumps),
        st.dictionaries(st.just("text"), json_values, min_size=1).map(json.dumps),
        st.text(max_size=80).map(lambda t: json.dumps({"text": t})),
        adversarial_json,
        st.text(max_size=80),
    )
    lines = draw(st.lists(line, min_size=1, max_size=5))
    sep = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    text = sep.join(lines)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"]))
    return text.encode(encoding, errors="surrogatepass" if encoding == "utf-8" else "replace")


NAMES = ("general", "code", "math")
weights = st.one_of(json_values, st.floats(), st.integers(-(10**400), 10**400))


@st.composite
def mixture_texts(draw) -> str:
    """What a user might give as --mixture: name=w lists, JSON, hostile text, file paths."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.text(max_size=60))
    if kind == 1:
        entries = draw(
            st.lists(
                st.tuples(
                    st.one_of(st.sampled_from(NAMES), st.text(max_size=6)),
                    st.one_of(
                        st.floats().map(repr), st.text(max_size=6), st.sampled_from(["nan", "-inf"])
                    ),
                ),
                max_size=4,
            )
        )
        return ",".join(f"{n}={v}" for n, v in entries)
    if kind == 2:
        raw = draw(st.one_of(json_values, st.dictionaries(st.sampled_from(NAMES), weights)))
        if draw(st.booleans()):
            raw = {"mixture": raw}
        return json.dumps(raw)
    if kind == 3:
        return draw(adversarial_json)
    path = SCRATCH / f"mixture-{draw(st.integers(0, 9))}.json"
    path.write_bytes(draw(jsonl_files()))
    return str(path)


def _leaves(node, path=()):
    """Every (path, value) of a nested dict/list config."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _leaves(value, (*path, i))
    yield path, node


@st.composite
def config_texts(draw) -> str:
    """Config YAML: a valid config with one value, key or line changed, YAML snippets, or text."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.text(max_size=200))
    raw = smoke_config_dict(Path("/corpus"))
    if kind == 1:  # one value replaced, or one key added, anywhere
        path, _ = draw(st.sampled_from(list(_leaves(raw))))
        node = raw
        for key in path[:-1]:
            node = node[key]
        if path and draw(st.booleans()):
            node[path[-1]] = draw(json_values)
        elif isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(json_values)
        return yaml.safe_dump(raw, allow_unicode=True)
    lines = yaml.safe_dump(raw, sort_keys=False).splitlines()
    if kind == 2:  # a line duplicated, dropped or replaced by a YAML snippet
        i = draw(st.integers(0, len(lines) - 1))
        snippet = draw(
            st.sampled_from(
                [
                    lines[i],
                    "",
                    "seed: 2024-13-45",
                    "seed: !!python/object/apply:os.system ['true']",
                    "seed: &a [*a]",
                    "x: &a\n  y: *a",
                    "seed: !!binary zz",
                    "seed: 1e999",
                    "seed: 0x_",
                    "? [a]\n: 1",
                    "<<: {seed: 3}",
                    "\t\x00",
                    "seed: " + "[" * 3000,
                ]
            )
        )
        lines.insert(i, snippet)
        return "\n".join(lines)
    return "\n".join(draw(st.permutations(lines))[: draw(st.integers(0, len(lines)))])


VALID_CONFIG = yaml.safe_dump(smoke_config_dict(Path("/corpus")))
override_items = st.one_of(
    st.text(max_size=40),
    st.tuples(
        st.one_of(
            st.sampled_from(
                ["seed", "merge.method", "train.batch_size", "data.datasets.0.name", "a..b", "."]
            ),
            st.text(max_size=12),
        ),
        st.one_of(
            st.text(max_size=20),
            json_values.map(json.dumps),
            st.sampled_from(["[", "{a: 1, a: 2}", "2024-13-45", "&a [*a]", "!!binary zz"]),
        ),
    ).map(lambda kv: f"{kv[0]}={kv[1]}"),
)


@st.composite
def safetensors_files(draw) -> bytes:
    """Safetensors files: valid ones (about a third), ones with one thing changed (the header
    length, the data size, one field of one entry, the metadata), arbitrary bytes."""
    change = draw(st.sampled_from(["none", "none", "bytes", "length", "data", "field", "meta"]))
    if change == "bytes":
        return draw(st.binary(max_size=200))
    header: dict = {}
    offset = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(list(NUMPY_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    if change == "meta":
        header["__metadata__"] = draw(json_values)
    if change == "field" and header:
        name = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
        value = draw(
            st.one_of(
                json_values,
                st.lists(st.integers(-(2**65), 2**65), max_size=3),
                st.sampled_from(["F8_E4M3", "X9", "f32"]),
            )
        )
        if field is None or not isinstance(header[name], dict):
            header[name] = value
        else:
            header[name][field] = value
    text = json.dumps(header).encode()
    if draw(st.booleans()):
        text += b" " * (-len(text) % 8)
    length = draw(st.integers(0, 2**64 - 1)) if change == "length" else len(text)
    size = max(0, offset + draw(st.integers(-3, 3))) if change == "data" else offset
    return struct.pack("<Q", length) + text + bytes(size)


file_entries = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["../x", "/abs", "a/../b", "a//b", "a\\b", "./a", "", ".", "ok/file.bin"]),
)
manifest_texts = st.one_of(
    st.binary(max_size=100),
    json_values.map(json.dumps),
    adversarial_json,
    st.fixed_dictionaries(
        {
            "kind": st.one_of(st.just("demix.model"), json_values),
            "files": st.one_of(
                json_values,
                st.dictionaries(
                    file_entries,
                    st.one_of(
                        json_values,
                        st.fixed_dictionaries({"size": json_values, "sha256": json_values}),
                    ),
                    max_size=3,
                ),
            ),
        }
    ).map(json.dumps),
)

# ---------------------------------------------------------------- properties


def _refused_or(call, *args, **kwargs):
    """call(...)'s value, or None when it refused the input with a one-line DemixError."""
    try:
        return call(*args, **kwargs)
    except DemixError as err:
        assert "\n" not in str(err) and str(err).strip(), repr(str(err))
        return None


@FUZZ
@given(blob=jsonl_files())
def test_jsonl_lines_parse_or_refuse(blob):
    reliability.count("fuzz_jsonl")
    path = SCRATCH / "fuzz.jsonl"
    path.write_bytes(blob)
    spec = DatasetSpec(name="fuzz", paths=[str(path)])

    def read_and_hash():
        for doc in read_file_documents(path, spec):
            assert isinstance(doc, str)
            normalize(doc).encode("utf-8")  # what curation hashes

    _refused_or(read_and_hash)


@FUZZ
@given(text=mixture_texts())
def test_mixtures_parse_or_refuse(text):
    reliability.count("fuzz_mixtures")
    mixture = _refused_or(parse_mixture, text)
    if mixture is not None:
        assert all(isinstance(k, str) and k for k in mixture)
        assert all(isinstance(w, float) and math.isfinite(w) and w >= 0 for w in mixture.values())


@FUZZ
@given(text=config_texts())
def test_configs_parse_or_refuse(text):
    reliability.count("fuzz_configs")
    config = _refused_or(resolve_config, text, None, "config.yaml")
    assert config is None or isinstance(config, RunConfig)


@FUZZ
@given(raw=json_values)
def test_config_values_parse_or_refuse(raw):
    reliability.count("fuzz_configs")
    assert _refused_or(parse_config, raw) is None  # no JSON value by chance is a full config


@FUZZ
@given(items=st.lists(override_items, max_size=3))
def test_overrides_parse_or_refuse(items):
    reliability.count("fuzz_overrides")
    overrides = _refused_or(parse_overrides, items)
    if overrides is not None:
        config = _refused_or(resolve_config, VALID_CONFIG, overrides, "config.yaml")
        assert config is None or isinstance(config, RunConfig)


@FUZZ
@given(blob=safetensors_files())
def test_safetensors_headers_parse_or_refuse(blob):
    """What demix's reader accepts, the safetensors library loads, with the same values."""
    import torch
    from safetensors.torch import load_file

    reliability.count("fuzz_safetensors")
    path = SCRATCH / "fuzz.safetensors"
    path.write_bytes(blob)
    mapped = _refused_or(MappedSafetensors, path)
    if mapped is None:
        return
    loaded = load_file(path)
    assert sorted(loaded) == sorted(mapped.names())
    for name in mapped.names():
        ours, theirs = mapped.tensor(name), loaded[name]
        assert tuple(ours.shape) == tuple(theirs.shape) and ours.dtype == theirs.dtype
        if ours.numel():
            as_bytes = [t.reshape(-1).clone().view(torch.uint8) for t in (ours, theirs)]
            assert torch.equal(*as_bytes)


@FUZZ
@given(text=manifest_texts, as_bytes=st.booleans())
def test_manifests_parse_or_refuse(text, as_bytes):
    reliability.count("fuzz_manifests")
    if as_bytes and isinstance(text, str):
        text = text.encode()
    manifest = _refused_or(parse_manifest, text, "fuzz/manifest.json")
    if manifest is not None:
        assert isinstance(manifest, dict)
        for rel in manifest.get("files", {}):
            check_manifest_entry(rel, "fuzz/manifest.json")  # nothing escapes the artifact
