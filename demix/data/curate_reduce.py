"""Curation, reduce: the groups merged in file order, duplicates across groups dropped,
held-out documents chosen per dataset, and the token files concatenated into one dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np

from demix.config import DataConfig
from demix.data.curate_plan import GROUP_KIND, read_plan
from demix.data.shards import DATASET_KIND
from demix.data.sources import (
    HASH_BYTES,
)
from demix.errors import DataError
from demix.storage import (
    read_manifest,
    staged_dir,
    write_manifest,
)

# Tokens copied per write when the reduce concatenates the groups' token files.
COPY_CHUNK_TOKENS = 1 << 24

log = logging.getLogger(__name__)


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


def _oversize(stats: dict) -> str:
    """The documents over data.max_document_bytes skipped or truncated, for the log."""
    skipped, cut = stats.get("oversize_skipped", 0), stats.get("oversize_truncated", 0)
    if not skipped and not cut:
        return ""
    return f"{skipped} over data.max_document_bytes skipped, {cut} truncated, "


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
    token prior is each dataset's share of the full_train_tokens. Documents over
    data.max_document_bytes that the groups skipped or truncated are summed per dataset as
    oversize_skipped and oversize_truncated (recorded only when not 0) and logged.
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
        oversize = {"oversize_skipped": 0, "oversize_truncated": 0}
        for folder, manifest in groups:
            counts = manifest["datasets"].get(spec.name)
            if counts is None:
                continue
            short += counts["dropped_short"]
            for key in oversize:
                oversize[key] += counts.get(key, 0)
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
            **{key: n for key, n in oversize.items() if n},  # data.max_document_bytes
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
            f"{_oversize(s)}prior {prior[name]:.3f} ({s['prior_source']}"
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
