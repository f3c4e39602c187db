"""Curation: read candidate datasets, clean, dedupe, split, tokenize and pack token streams.

Three steps, the same in one process (`curate`) and fanned out over KFP tasks:

- plan (`plan_curation`): list the input files, split them into contiguous groups, and decide
  the tokenizer (a base model's, or a BPE trained on a bounded sample) before anything is
  tokenized;
- map (`curate_group`, one per group): clean, drop short documents, dedupe within the group,
  tokenize; keeps each document's tokens, length and content hash;
- reduce (`merge_groups`): merge the groups in file order, drop duplicates across groups (the
  first kept), pick held-out documents per dataset and write the `demix.dataset` artifact:
  tokenizer/, <name>/train.bin, <name>/heldout.bin (every document followed by eos) and
  manifest.json last, with token counts per dataset (the prior).

Targets (`data.targets`) go through the same steps after the candidates, so a target document
that repeats a candidate's is dropped from the target; every kept target document is held out
(<target>/heldout.bin, an empty train.bin) and the manifest lists targets apart from the
candidate datasets, outside the prior. The tokenizer sample is drawn from the candidates only.

With `data.max_tokens`, a dataset larger than that is curated from a sample of its documents:
the plan fixes a keep fraction f per dataset (`keep_fraction`, from the bytes per token of a
few of its files), each group keeps a document when the first 8 bytes of its content hash, as
an integer, are under f x 2^64, and every other document is read, cleaned and hashed but not
tokenized or stored. The choice depends on the document alone, never on grouping or file
order, so repeats share it and deduplication is as without the sample: a document left out
still removes its later repeats, in its own dataset and in the datasets after it, whose
documents are then exactly what they are without max_tokens. Held-out documents are chosen
among the kept ones. The token prior counts the whole dataset, estimated as its kept tokens /
f (each document is kept with probability f whatever its length, so the estimate is unbiased;
its relative error is about sqrt((1 - f) / kept documents) for documents of similar length),
held-out tokens subtracted as they are from a counted dataset; the manifest records both
counts (see merge_groups).

Groups are contiguous runs of the files in config order, so the result does not depend on how
many there are. Reading and normalizing documents live in `demix.data.sources`, the tokenizer
in `demix.data.tokenizer`. One coherent thing over ~400 lines: the three steps share the plan
and group formats defined here.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

from demix.config import DataConfig, DatasetSpec, per_dataset
from demix.data.shards import DATASET_KIND
from demix.data.sources import (
    HASH_BYTES,
    InputFile,
    clean_document,
    dataset_files,
    input_files,
    normalize,
    read_documents,
    read_file_documents,
)
from demix.data.tokenizer import (
    encode_documents,
    file_order,
    load_base_tokenizer,
    tokenizer_sample,
    train_tokenizer,
)
from demix.errors import DataError
from demix.storage import (
    atomic_write_json,
    fetch_files,
    read_manifest,
    staged_dir,
    write_manifest,
)

# dataset_files, input_files, normalize, read_documents (sources) and tokenizer_sample,
# train_tokenizer (tokenizer) are re-exported: callers import them from here too.
__all__ = [
    "curate",
    "curate_group",
    "dataset_files",
    "group_bounds",
    "heldout_indices",
    "input_files",
    "merge_groups",
    "normalize",
    "plan_curation",
    "read_documents",
    "read_plan",
    "tokenizer_sample",
    "train_tokenizer",
]

PLAN_KIND = "demix.curation_plan"
GROUP_KIND = "demix.curation_group"
PLAN_FILE = "plan.json"
# Tokens copied per write when the reduce concatenates the groups' token files.
COPY_CHUNK_TOKENS = 1 << 24
# The most tokens the plan reads of a dataset to measure its bytes per token (data.max_tokens).
PROBE_TOKENS = 1 << 24

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- plan


def group_bounds(sizes: list[int], groups: int) -> list[tuple[int, int]]:
    """Split files (in order) into min(groups, files) contiguous runs of about equal bytes.

    Run i starts at the first file that starts at or after i / groups of the bytes, moved
    just enough that no run is empty. Returns [start, end) file index ranges, in order.
    """
    n = len(sizes)
    k = min(groups, n)
    weights = sizes if sum(sizes) else [1] * n
    starts = np.concatenate([[0], np.cumsum(weights)[:-1]])
    cuts = [0]
    for i in range(1, k):
        first = int(np.searchsorted(starts, sum(weights) * i / k, side="left"))
        cuts.append(min(max(first, cuts[-1] + 1), n - (k - i)))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def keep_fraction(
    spec: DatasetSpec, files: list[InputFile], config: DataConfig, tokenizer, dtype: np.dtype
) -> float:
    """The share f of a dataset's documents to keep for about its data.max_tokens tokens.

    f = max_tokens x bytes per token / the bytes of all its `files` (at most 1), bytes per
    token measured on whole files read in `file_order` until their cleaned documents hold
    min(max_tokens, PROBE_TOKENS) tokens. Bytes are the listed file sizes, compressed ones for
    .zst and Parquet, in the same units as the total. A dataset under max_tokens is read whole
    and gets f = 1. Raises DataError for an unreadable or malformed file read.
    """
    max_tokens = per_dataset(config.max_tokens, spec.name)
    read = tokens = 0
    with open(os.devnull, "wb") as sink:
        for i in file_order(spec.name, files):
            if tokens >= min(max_tokens, PROBE_TOKENS):
                break
            raw = read_file_documents(fetch_files(files[i].uri), spec)
            docs = [c[0] for c in (clean_document(r, config.min_chars) for r in raw) if c]
            tokens += sum(encode_documents(tokenizer, docs, 0, dtype, sink))
            read += files[i].size
    total = sum(f.size for f in files)
    return min(1.0, max_tokens * read / (tokens * total)) if tokens and total else 1.0


def plan_curation(
    config: DataConfig,
    out: str | Path,
    seed: int,
    tokenizer_dir: str | Path | None = None,
    groups: int | None = None,
    **manifest_fields,
) -> dict:
    """Write the curation plan artifact `out` (plan.json, tokenizer/, manifest last); return the plan.

    The plan lists every input file in config order, split into at most `groups` (default
    data.curate_groups) contiguous groups, and fixes the tokenizer: a copy of the base model's
    (`tokenizer_dir`) or a byte-level BPE trained on `tokenizer_sample`, and the keep fraction
    of each dataset with data.max_tokens (`keep_fraction`). `manifest_fields` pass through to
    the curated dataset's manifest.
    Raises DataError for missing/unreadable/binary/malformed inputs or an empty tokenizer
    sample, ModelError for an unusable base tokenizer; `out` is untouched on error.
    """
    start = time.perf_counter()
    files = [f for spec in config.all_specs for f in input_files(spec)]
    bounds = group_bounds([f.size for f in files], groups or config.curate_groups)
    sample_stats = None
    if tokenizer_dir is not None:
        tokenizer = load_base_tokenizer(Path(tokenizer_dir))
    else:
        candidates = set(config.names)
        texts = tokenizer_sample([f for f in files if f.dataset in candidates], config)
        if not texts:
            raise DataError(
                f"no document of at least data.min_chars={config.min_chars} characters in the "
                f"files sampled for the tokenizer (datasets {config.names}); check their paths "
                "and text_field"
            )
        tokenizer = train_tokenizer(texts, config.tokenizer.vocab_size)
        sample_stats = {"documents": len(texts), "chars": sum(len(t) for t in texts)}
    vocab = len(tokenizer)
    # Token ids run from 0 to vocab - 1.
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    keep = {
        spec.name: keep_fraction(
            spec, [f for f in files if f.dataset == spec.name], config, tokenizer, dtype
        )
        for spec in config.datasets
        if per_dataset(config.max_tokens, spec.name) is not None
    }
    plan = {
        "seed": seed,
        "data": config.model_dump(mode="json"),
        "vocab_size": vocab,
        "eos_token_id": int(tokenizer.eos_token_id),
        "dtype": dtype.name,
        "tokenizer_sample": sample_stats,
        "keep_fractions": keep,
        "manifest_fields": manifest_fields,
        "groups": [
            [{"dataset": f.dataset, "uri": f.uri, "size": f.size} for f in files[a:b]]
            for a, b in bounds
        ],
    }
    with staged_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        atomic_write_json(tmp / PLAN_FILE, plan)
        write_manifest(tmp, PLAN_KIND, seconds=round(time.perf_counter() - start, 1))
    tokens = (
        f"tokenizer trained on {sample_stats['chars']:,} characters of "
        f"{sample_stats['documents']} documents"
        if sample_stats
        else f"tokenizer of {tokenizer_dir}"
    )
    kept = "".join(f", keeps {f:.2%} of {n}'s documents" for n, f in keep.items() if f < 1)
    log.info(
        f"curate plan: {len(files)} files in {len(bounds)} groups, {tokens}{kept}, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return plan


def read_plan(plan_dir: str | Path) -> tuple[dict, str]:
    """(plan, plan id: sha256 of plan.json) of a curation plan artifact, its files verified.

    Raises DataError for a missing, incomplete or corrupt plan.
    """
    manifest = read_manifest(plan_dir, kind=PLAN_KIND, verify=True)
    if PLAN_FILE not in manifest["files"]:
        raise DataError(f"{plan_dir}: the curation plan lists no {PLAN_FILE}; plan again")
    plan = json.loads((Path(plan_dir) / PLAN_FILE).read_text())
    return plan, manifest["files"][PLAN_FILE]["sha256"]


# ---------------------------------------------------------------- map


def curate_group(plan_dir: str | Path, index: int, out: str | Path) -> dict:
    """Curate group `index` of a plan into the artifact `out`; return its manifest.

    Per dataset of the group: <name>/tokens.bin (each kept document's tokens and eos, in file
    order), <name>/lengths.bin (int64 tokens per document), <name>/hashes.bin (the 32-byte
    sha256 of each document's normalized text) and <name>/left_out.bin (the hashes of the
    documents the plan's keep fraction leaves out, never tokenized). Documents shorter than
    data.min_chars and repeats within the group (of any dataset, left out or not) are dropped
    and counted.
    Raises DataError for an unknown group, an input that changed since the plan was made, or
    an unreadable/binary/malformed file; `out` is untouched on error.
    """
    start = time.perf_counter()
    plan, plan_id = read_plan(plan_dir)
    if not 0 <= index < len(plan["groups"]):
        raise DataError(
            f"{plan_dir}: no group {index}; the curation plan has groups 0-{len(plan['groups']) - 1}"
        )
    config = DataConfig.model_validate(plan["data"])
    specs = {spec.name: spec for spec in config.all_specs}
    from demix.model import load_tokenizer

    tokenizer = load_tokenizer(Path(plan_dir) / "tokenizer")
    eos, dtype = int(plan["eos_token_id"]), np.dtype(plan["dtype"])
    files = plan["groups"][index]
    keep = plan.get("keep_fractions", {})
    seen: set[bytes] = set()
    stats: dict[str, dict] = {}
    with staged_dir(out) as tmp:
        for name in dict.fromkeys(f["dataset"] for f in files):
            (tmp / name).mkdir()
            docs, short, dups, left, lengths = 0, 0, 0, 0, []
            threshold = int(keep.get(name, 1.0) * 2**64)  # kept: hash[:8] under it
            with (
                open(tmp / name / "tokens.bin", "wb") as tokens,
                open(tmp / name / "hashes.bin", "wb") as hashes,
                open(tmp / name / "left_out.bin", "wb") as left_out,
            ):
                for entry in (f for f in files if f["dataset"] == name):
                    path = fetch_files(entry["uri"])
                    size = path.stat().st_size if path.is_file() else None
                    if size != entry["size"]:
                        raise DataError(
                            f"{entry['uri']}: {'missing' if size is None else f'{size} bytes'}, "
                            f"{entry['size']} bytes when the curation plan was made; an input "
                            "changed during curation, curate again"
                        )
                    kept: list[str] = []
                    for raw in read_file_documents(path, specs[name]):
                        cleaned = clean_document(raw, config.min_chars)
                        if cleaned is None:
                            short += 1
                        elif cleaned[1] in seen:
                            dups += 1
                        elif int.from_bytes(cleaned[1][:8], "big") >= threshold:
                            seen.add(cleaned[1])
                            left_out.write(cleaned[1])
                            left += 1
                        else:
                            seen.add(cleaned[1])
                            kept.append(cleaned[0])
                            hashes.write(cleaned[1])
                    lengths += encode_documents(tokenizer, kept, eos, dtype, tokens)
                    docs += len(kept)
            np.asarray(lengths, dtype="<i8").tofile(tmp / name / "lengths.bin")
            stats[name] = {
                "documents": docs,
                "dropped_short": short,
                "duplicates_removed": dups,
                "left_out": left,
                "tokens": int(sum(lengths)),
            }
        manifest = write_manifest(
            tmp,
            GROUP_KIND,
            plan=plan_id,
            group=index,
            datasets=stats,
            seconds=round(time.perf_counter() - start, 1),
        )
    log.info(
        f"curate group {index + 1}/{len(plan['groups'])}: {len(files)} files, "
        f"{sum(s['documents'] for s in stats.values())} documents, "
        f"{sum(s['tokens'] for s in stats.values()):,} tokens, {manifest['seconds']:.1f} s"
    )
    return manifest


# ---------------------------------------------------------------- reduce


def heldout_indices(hashes: list[str], config: DataConfig, seed: int) -> set[int]:
    """Indices of held-out documents: the first k in a seeded order of document hashes.

    k = heldout_fraction of the documents, at least min_heldout_documents (1 by default) when
    there are 2 or more, capped at max_heldout_documents, never all.
    """
    n = len(hashes)
    if n < 2:
        return set()
    least = config.min_heldout_documents
    k = min(max(least, round(config.heldout_fraction * n)), config.max_heldout_documents, n - 1)
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{hashes[i]}".encode()).digest())
    return set(order[:k])


@dataclasses.dataclass
class _Part:
    """One dataset's documents in one group, and where each goes: 0 dropped, 1 train, 2 held out."""

    folder: Path
    lengths: np.ndarray
    dest: np.ndarray


def _read_part(
    folder: Path, counts: dict, dtype: np.dtype
) -> tuple[list[bytes], np.ndarray, list[bytes]]:
    """(content hashes, token lengths, hashes of the documents left out) of one dataset's
    documents in a curated group, `counts` its entry in the group's manifest."""
    raw = (folder / "hashes.bin").read_bytes()
    left = (folder / "left_out.bin").read_bytes()
    lengths = np.fromfile(folder / "lengths.bin", dtype="<i8")
    tokens = (folder / "tokens.bin").stat().st_size
    documents = counts["documents"]
    if (
        len(raw) != documents * HASH_BYTES
        or len(left) != counts["left_out"] * HASH_BYTES
        or len(lengths) != documents
        or (tokens != int(lengths.sum()) * dtype.itemsize)
    ):
        raise DataError(
            f"{folder}: its files do not hold the {documents} documents its manifest lists; "
            "curate the group again"
        )
    return _split(raw), lengths, _split(left)


def _split(raw: bytes) -> list[bytes]:
    """Concatenated content hashes, one by one."""
    return [raw[i : i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES)]


def _group_manifests(plan: dict, plan_id: str, group_dirs: list[Path]) -> list[tuple[Path, dict]]:
    """The curated groups of the plan, in group order; each must be given exactly once."""
    found: dict[int, tuple[Path, dict]] = {}
    for folder in group_dirs:
        manifest = read_manifest(folder, kind=GROUP_KIND)
        if manifest.get("plan") != plan_id:
            raise DataError(
                f"{folder}: a curated group of another curation plan; curate the groups of "
                "this plan again"
            )
        index = int(manifest["group"])
        if index in found:
            raise DataError(f"{folder}: group {index} is given twice (also {found[index][0]})")
        found[index] = (folder, manifest)
    missing = sorted(set(range(len(plan["groups"]))) - set(found))
    if missing:
        raise DataError(
            f"curated groups {missing} of {len(plan['groups'])} are missing; curate them first"
        )
    return [found[i] for i in range(len(plan["groups"]))]


def _copy_runs(part: _Part, dtype: np.dtype, outputs: dict[int, BinaryIO]) -> None:
    """Append each run of documents with the same destination to that destination's file."""
    if not len(part.dest):
        return
    tokens = np.memmap(part.folder / "tokens.bin", dtype=dtype, mode="r")
    offsets = np.concatenate([[0], np.cumsum(part.lengths)])
    change = np.flatnonzero(np.diff(part.dest)) + 1
    for first, last in zip(
        np.concatenate([[0], change]), np.concatenate([change, [len(part.dest)]]), strict=True
    ):
        target = outputs.get(int(part.dest[first]))
        if target is None:
            continue
        for at in range(int(offsets[first]), int(offsets[last]), COPY_CHUNK_TOKENS):
            np.asarray(tokens[at : min(at + COPY_CHUNK_TOKENS, int(offsets[last]))]).tofile(target)


def _full_counts(counts: dict, keep: float, left: int) -> dict:
    """What a candidate dataset's manifest entry records about its sample (see merge_groups)."""
    train, heldout = counts["train_tokens"], counts["heldout_tokens"]
    return {
        "keep_fraction": keep,
        "left_out_documents": left,
        "full_train_tokens": round((train + heldout) / keep) - heldout if left else train,
        "prior_source": "estimated" if left else "counted",
    }


def merge_groups(plan_dir: str | Path, group_dirs: list[str | Path], out: str | Path) -> dict:
    """Merge the curated groups of a plan into the dataset artifact `out`; return its manifest.

    Groups are taken in plan order whatever the order of `group_dirs`. A document whose hash
    an earlier group (or dataset) already read, kept or left out, is dropped and counted as a
    duplicate; per dataset, held-out documents are chosen by `heldout_indices` over the
    remaining hashes; train.bin and heldout.bin concatenate their documents in file order.
    Per candidate dataset the manifest records keep_fraction (the plan's; 1 without
    data.max_tokens), left_out_documents, full_train_tokens (the train tokens of all of it:
    (train + held-out tokens) / keep_fraction - held-out tokens, train_tokens when nothing was
    left out) and prior_source (`counted`, or `estimated` when documents were left out); the
    token prior is each dataset's share of the full_train_tokens.
    Raises DataError for a missing, repeated or foreign group and for a dataset that is empty
    after cleaning; `out` is untouched on error.
    """
    start = time.perf_counter()
    plan, plan_id = read_plan(plan_dir)
    config = DataConfig.model_validate(plan["data"])
    groups = _group_manifests(plan, plan_id, [Path(d) for d in group_dirs])
    dtype = np.dtype(plan["dtype"])
    keep = plan.get("keep_fractions", {})
    seen: set[bytes] = set()
    parts: dict[str, list[_Part]] = {}
    stats: dict[str, dict] = {}
    targets = set(config.target_names)
    for spec in config.all_specs:
        short, dups, left, hashes, parts[spec.name] = 0, 0, 0, [], []
        for folder, manifest in groups:
            counts = manifest["datasets"].get(spec.name)
            if counts is None:
                continue
            short += counts["dropped_short"]
            dups += counts["duplicates_removed"]
            digests, lengths, left_out = _read_part(folder / spec.name, counts, dtype)
            dest = np.zeros(len(digests), dtype=np.int8)
            for i, digest in enumerate(digests):
                if digest in seen:
                    dups += 1
                    continue
                seen.add(digest)
                dest[i] = 1
                hashes.append(digest.hex())
            parts[spec.name].append(_Part(folder / spec.name, lengths, dest))
            for digest in left_out:
                dups += digest in seen
                left += digest not in seen
                seen.add(digest)
        if not hashes:
            kind = "target" if spec.name in targets else "dataset"
            raise DataError(
                f"{kind} {spec.name!r} is empty after cleaning ({short} documents shorter than "
                f"data.min_chars={config.min_chars}, {dups} duplicates"
                f"{' of candidate or earlier documents' if spec.name in targets else ''}"
                f"{f', {left} left out by data.max_tokens' if left else ''}); "
                f"check its paths{', where' if spec.where else ''} and text_field"
            )
        if spec.name in targets:
            held = set(range(len(hashes)))  # a target is never trained on
        else:
            held = heldout_indices(hashes, config, plan["seed"])
        position = 0  # of the dataset's first kept document in this group among all kept
        for part in parts[spec.name]:
            kept = np.flatnonzero(part.dest)
            is_held = np.fromiter((position + k in held for k in range(len(kept))), bool, len(kept))
            part.dest[kept[is_held]] = 2
            position += len(kept)
        stats[spec.name] = {
            "documents": len(hashes) - len(held),
            "heldout_documents": len(held),
            "dropped_short": short,
            "duplicates_removed": dups,
            "sources": list(spec.paths),
            "train_tokens": sum(int(p.lengths[p.dest == 1].sum()) for p in parts[spec.name]),
            "heldout_tokens": sum(int(p.lengths[p.dest == 2].sum()) for p in parts[spec.name]),
        }
        if spec.name not in targets:
            stats[spec.name].update(_full_counts(stats[spec.name], keep.get(spec.name, 1.0), left))
    target_stats = {name: stats.pop(name) for name in config.target_names}
    total = sum(s["full_train_tokens"] for s in stats.values())
    prior = {name: s["full_train_tokens"] / total for name, s in stats.items()}
    seconds = read_manifest(plan_dir)["seconds"] + sum(m["seconds"] for _, m in groups)
    with staged_dir(out) as tmp:
        shutil.copytree(Path(plan_dir) / "tokenizer", tmp / "tokenizer")
        for name, dataset_parts in parts.items():
            (tmp / name).mkdir()
            with (
                open(tmp / name / "train.bin", "wb") as train,
                open(tmp / name / "heldout.bin", "wb") as heldout,
            ):
                for part in dataset_parts:
                    _copy_runs(part, dtype, {1: train, 2: heldout})
        extra = {"tokenizer_sample": plan["tokenizer_sample"]} if plan["tokenizer_sample"] else {}
        manifest = write_manifest(
            tmp,
            DATASET_KIND,
            datasets=stats,
            targets=target_stats,
            token_prior=prior,
            dtype=dtype.name,
            vocab_size=plan["vocab_size"],
            eos_token_id=plan["eos_token_id"],
            tokenizer="tokenizer",
            **extra,
            seconds=round(seconds + time.perf_counter() - start, 1),
            **plan["manifest_fields"],
        )
    for name, s in stats.items():
        log.info(
            f"curate {name}: {s['documents']} train + {s['heldout_documents']} held-out "
            f"docs, {s['train_tokens']:,} train + {s['heldout_tokens']:,} held-out tokens, "
            f"{s['duplicates_removed']} duplicates, {s['dropped_short']} short, "
            f"prior {prior[name]:.3f} ({s['prior_source']}"
            + (
                f": {s['left_out_documents']} docs left out by data.max_tokens, "
                f"~{s['full_train_tokens']:,} train tokens in all)"
                if s["left_out_documents"]
                else ")"
            )
        )
    for name, s in target_stats.items():
        log.info(
            f"curate target {name}: {s['heldout_documents']} held-out docs, "
            f"{s['heldout_tokens']:,} tokens, {s['duplicates_removed']} duplicates (of candidate "
            f"documents or its own), {s['dropped_short']} short; never trained on"
        )
    log.info(
        f"curate: {len(groups)} groups merged in {time.perf_counter() - start:.1f} s, "
        f"curation total {manifest['seconds']:.1f} s -> {out}"
    )
    return manifest


# ---------------------------------------------------------------- in one process


def curate(
    config: DataConfig,
    out: str | Path,
    seed: int,
    tokenizer_dir: str | Path | None = None,
    groups: int | None = None,
    **manifest_fields,
) -> dict:
    """Curate `config.datasets` (and `config.targets`) into the artifact folder `out`; return its
    manifest.

    Plan, every group and the merge in this process, with the plan and groups in a temporary
    folder beside `out`. Cleaning (`normalize`): lone surrogates replaced by U+FFFD, NFC, unix
    newlines, trailing spaces stripped; documents shorter than config.min_chars dropped; exact
    duplicates (sha256 of the normalized text) removed within and across datasets, the first in
    config order kept. With `tokenizer_dir` (a base model) its tokenizer is copied, else a
    byte-level BPE is trained on a sample.
    `groups` (default data.curate_groups) does not change the result.
    Raises DataError for missing/unreadable/binary/malformed inputs and for a dataset that is
    empty after cleaning, ModelError for an unusable base tokenizer; `out` is untouched on error.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = f".{out.name}.curate-"
    for stale in out.parent.glob(f"{glob.escape(scratch)}*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=scratch) as work:
        plan_dir = Path(work) / "plan"
        plan = plan_curation(config, plan_dir, seed, tokenizer_dir, groups, **manifest_fields)
        group_dirs = [Path(work) / f"group-{i}" for i in range(len(plan["groups"]))]
        for index, folder in enumerate(group_dirs):
            curate_group(plan_dir, index, folder)
        return merge_groups(plan_dir, group_dirs, out)
