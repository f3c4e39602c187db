"""The user's own base model (`model.base`): a local folder, a gs:// folder or a hub id.

A base is a Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer files), with
or without a demix manifest, given as one of three forms:

    local   a folder on this machine (KFP's /gcs/ mount included): used where it is
    gcs     gs://BUCKET/PATH: downloaded once into the cache (DEMIX_CACHE); a cached file is
            reused while the object's crc32c and generation are those it was downloaded at
    hub     ORG/NAME or ORG/NAME@REVISION: fetched with huggingface_hub when the hub is
            reachable (HF_HUB_OFFLINE unset or 0), its resolved commit recorded

`resolve_base` fetches and verifies a base once (weight headers by demix's own safetensors
reader, config.json by AutoConfig, the tokenizer by AutoTokenizer; remote code never runs) and
fingerprints it by content: sha256 of the files of a local copy (each file's hash cached by
path, size and mtime, so a large base is hashed once per machine), or the size and crc32c
of each object of a gs:// folder from one listing (`base_fingerprint`, nothing
downloaded). `write_base_artifact` writes a verified copy as a demix model artifact: how the
base enters a pipeline as an artifact with its source, revision and fingerprint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from demix.base_hub import OFFLINE, base_form, fetch_hub, hub_offline, offline_error
from demix.errors import DataError, ModelError

__all__ = [
    "BASE_FILES",
    "ResolvedBase",
    "base_fingerprint",
    "base_form",
    "base_lineage",
    "base_tokenizer_dir",
    "check_base_reachable",
    "hub_offline",
    "model_folder",
    "resolve_base",
    "write_base_artifact",
]

# The files of a model folder a base is made of (top level only): config, weights, tokenizer,
# chat template. Pickle weights, ONNX, READMEs and subfolders are never fetched or copied;
# *.py is kept for model.trust_remote_code, which stays off unless the user turns it on.
BASE_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py")
# Files demix writes into its artifacts: not part of the model (demix.storage).
_DEMIX_FILES = ("manifest.json", "demix-output.json")
_RECORD = ".demix-base.json"  # what a cached gs:// copy was downloaded from


def check_base_reachable(spec: str | None) -> None:
    """Refuse, before any work, a hub id as `model.base` while the hub is offline.

    Raises ConfigError (one line, saying how to give a folder instead).
    """
    if spec and base_form(spec) == "hub" and hub_offline():
        raise offline_error(spec, OFFLINE)


@dataclass(frozen=True)
class ResolvedBase:
    """A base fetched and verified: its local folder and what it was resolved from."""

    source: str  # model.base as given
    form: str  # local | gcs | hub
    folder: Path  # a local folder holding `files`
    files: tuple[str, ...]  # the model's files (BASE_FILES) in `folder`, sorted
    fingerprint: str  # by content: "sha256:..." (local, hub) or "gcs:..." (gs:// listing)
    revision: str | None = None  # hub: the resolved commit
    sha256: dict[str, str] = field(default_factory=dict)  # file -> sha256, where known

    def record(self) -> dict:
        """The base's lineage as model manifests and the summary record it."""
        return {
            "base_source": self.source,
            "base_revision": self.revision,
            "base_fingerprint": self.fingerprint,
        }


def is_base_file(rel: str) -> bool:
    """Whether a top-level file name belongs to the model (BASE_FILES, no demix files)."""
    return (
        "/" not in rel
        and not rel.startswith(".")
        and rel not in _DEMIX_FILES
        and any(fnmatch.fnmatchcase(rel, pattern) for pattern in BASE_FILES)
    )


def _digest(rows: list) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _cache(*parts: str) -> Path:
    from demix.storage import cache_dir

    return cache_dir().joinpath("bases", *parts)


# ---------------------------------------------------------------------------------- local


def cached_sha256(path: Path) -> str:
    """sha256 of a file, kept in the cache by path, size and mtime: hashed once per machine."""
    from demix.storage import kept_json, sha256_file

    path = Path(path).resolve()
    stat = path.stat()
    slot = _cache("sha256", hashlib.sha256(str(path).encode()).hexdigest() + ".json")
    return kept_json(slot, f"{path}:{stat.st_size}:{stat.st_mtime_ns}", lambda: sha256_file(path))


def _local_files(folder: Path) -> dict[str, str]:
    """{file: sha256} of a local base folder's model files, checked against its demix manifest
    when it has one.

    Raises ModelError for a missing folder; DataError naming the file that does not match the
    folder's manifest.
    """
    from demix.checkpoint import MODEL_KIND
    from demix.storage import MANIFEST, read_manifest

    if not folder.is_dir():
        raise ModelError(f"{folder}: model.base folder does not exist")
    hashes = {
        p.name: cached_sha256(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and is_base_file(p.name)
    }
    if (folder / MANIFEST).is_file():  # a demix artifact: exactly what its manifest lists
        read_manifest(folder, MODEL_KIND, verify=True)
    return hashes


def _content_fingerprint(folder: Path, hashes: dict[str, str]) -> str:
    rows = [[rel, (folder / rel).stat().st_size, digest] for rel, digest in sorted(hashes.items())]
    return "sha256:" + _digest(rows)


# ---------------------------------------------------------------------------------- gs://


def _listing(uri: str) -> tuple[object, str, dict[str, object]]:
    """(bucket, key, {file: blob}) of the model files of a gs:// folder, from one listing.

    Raises DataError for a missing bucket, or when the folder holds no model files.
    """
    from demix import gcs
    from demix.storage import split_gs

    bucket, key = split_gs(uri)
    bkt = gcs.bucket(bucket)
    blobs = gcs.list_blobs(bkt, f"{key}/")
    files = {
        name[len(key) + 1 :]: blob
        for name, blob in blobs.items()
        if is_base_file(name[len(key) + 1 :])
    }
    if not files:
        raise DataError(
            f"{uri}: no model files (config.json, *.safetensors, tokenizer) in the bucket; copy "
            "the folder written by save_pretrained there"
        )
    return bkt, key, files


def _gcs_fingerprint(files: dict[str, object]) -> str:
    # Content only (size and crc32c, as demix.storage.remote_files lists data): an object's
    # generation changes when the same bytes are uploaded again, and the listing in a KFP task
    # was seen without it.
    rows = [[rel, int(blob.size), str(blob.crc32c)] for rel, blob in sorted(files.items())]
    return "gcs:" + _digest(rows)


def _same_object(kept: dict, blob, path: Path) -> bool:
    """Whether the cached `path` was downloaded from this very object: the same crc32c and
    generation (where the listing gives one), and the file not touched since."""
    generation = None if blob.generation is None else str(blob.generation)
    stat = path.stat()
    return (
        kept.get("crc32c") == str(blob.crc32c)
        and (generation is None or kept.get("generation") in (None, generation))
        and kept.get("size") == stat.st_size == int(blob.size)
        and kept.get("mtime_ns") == stat.st_mtime_ns
    )


def _read_record(path: Path) -> dict:
    """What the cached files of a gs:// base were downloaded from ({} when unreadable)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _fetch_gcs(bkt, key: str, files: dict[str, object], weights: bool = True) -> Path:
    """The cached local copy of a gs:// base (without weights: its config and tokenizer): a
    file is downloaded only when its object's generation or crc32c changed since it was cached
    (or the cached file was touched).

    Raises DataError naming the object that never arrives intact.
    """
    from demix import gcs
    from demix.storage import atomic_write_json

    local = _cache("gcs", bkt.name, key)
    local.mkdir(parents=True, exist_ok=True)
    record_path = local / _RECORD
    record = _read_record(record_path)
    for rel, blob in sorted(files.items()):
        dest = local / rel
        if not weights and rel.endswith(".safetensors"):
            continue
        if dest.is_file() and _same_object(record.get(rel, {}), blob, dest):
            continue
        size = int(blob.size)
        gcs.download_file(
            blob,
            dest,
            check=lambda path, size=size: (
                None
                if path.stat().st_size == size
                else f"size {path.stat().st_size} != {size} listed by the bucket"
            ),
        )
        stat = dest.stat()
        generation = None if blob.generation is None else str(blob.generation)
        record[rel] = {
            "crc32c": str(blob.crc32c),
            "generation": generation,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
        atomic_write_json(record_path, record)  # each file as it arrives: a rerun resumes
    for stale in [p for p in local.iterdir() if p.is_file() and p.name != _RECORD]:
        if stale.name not in files:  # the cache is demix's own: objects removed since
            stale.unlink()
            record.pop(stale.name, None)
    atomic_write_json(record_path, record)
    return local


# ---------------------------------------------------------------------------------- verify


def verify_base(folder: Path, files: tuple[str, ...], trust_remote_code: bool = False) -> None:
    """Check a base folder without loading its weights: every safetensors header (demix's own
    reader), config.json through AutoConfig, the tokenizer through AutoTokenizer.

    Raises ModelError naming the folder and what is wrong.
    """
    from demix.checkpoint import check_weight_files, read_hf_config
    from demix.model import _quiet_transformers, load_tokenizer

    if "config.json" not in files:
        raise ModelError(f"{folder}: no config.json; expected a Hugging Face model folder")
    check_weight_files(folder)
    read_hf_config(folder)
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        AutoConfig.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # noqa: BLE001 (transformers raises ValueError, KeyError, OSError)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"{folder}: config.json does not load ({reason})") from None
    load_tokenizer(folder, trust_remote_code)


def _verify_once(base: ResolvedBase, trust_remote_code: bool) -> None:
    """verify_base, skipped when this machine verified the same content before."""
    key = f"{base.fingerprint}:{trust_remote_code}"
    mark = _cache("verified", hashlib.sha256(key.encode()).hexdigest())
    if mark.is_file():
        return
    verify_base(base.folder, base.files, trust_remote_code)
    from demix.storage import atomic_write_text

    atomic_write_text(mark, key + "\n")


# ---------------------------------------------------------------------------------- public


def resolve_base(spec: str, trust_remote_code: bool = False) -> ResolvedBase:
    """`model.base` fetched (gs://, hub) and verified once, with its content fingerprint.

    Raises ConfigError for a malformed value or a hub id the hub cannot give; DataError for a
    bucket or object that cannot be read, or a folder that does not match its manifest;
    ModelError for a folder that is not a loadable Hugging Face model.
    """
    form = base_form(spec)
    revision = None
    if form == "gcs":
        bkt, key, files = _listing(spec)
        folder = _fetch_gcs(bkt, key, files)
        base = ResolvedBase(spec, form, folder, tuple(sorted(files)), _gcs_fingerprint(files))
    else:
        if form == "hub":
            folder, revision = fetch_hub(spec, _cache("hub"), BASE_FILES)
        else:
            folder = Path(spec).expanduser()
        hashes = _local_files(folder)
        base = ResolvedBase(
            spec,
            form,
            folder,
            tuple(sorted(hashes)),
            _content_fingerprint(folder, hashes),
            revision,
            hashes,
        )
    _verify_once(base, trust_remote_code)
    return base


def base_tokenizer_dir(spec: str | None, trust_remote_code: bool = False) -> Path | None:
    """A local folder holding `model.base`'s tokenizer, for curation (None without a base): a
    gs:// base without its weights (they stay in the bucket until training needs them); the
    other forms resolved.

    Raises what resolve_base raises.
    """
    if not spec:
        return None
    if base_form(spec) != "gcs":
        return resolve_base(spec, trust_remote_code).folder
    bkt, key, files = _listing(spec)
    return _fetch_gcs(bkt, key, files, weights=False)


def model_folder(uri: str | Path) -> Path:
    """A model folder named on the command line (--init, --base): a demix artifact verified
    against its manifest, or a plain Hugging Face folder in a bucket fetched as a base.

    Raises DataError or ModelError naming the folder or object at fault.
    """
    from demix import gcs
    from demix.checkpoint import MODEL_KIND
    from demix.storage import MANIFEST, fetch_artifact, is_remote, split_gs

    if is_remote(uri):
        bucket, key = split_gs(str(uri))
        if gcs.read_bytes(gcs.bucket(bucket), f"{key}/{MANIFEST}") is None:
            return resolve_base(str(uri)).folder
    return fetch_artifact(uri, MODEL_KIND, require_manifest=False)


def base_fingerprint(spec: str) -> str:
    """The content fingerprint of `model.base` without downloading a gs:// base (one listing:
    each object's size and crc32c); a local folder by sha256 (cached per file), a hub id
    by the sha256 of its fetched snapshot.

    Raises ConfigError, DataError or ModelError as resolve_base does.
    """
    form = base_form(spec)
    if form == "gcs":
        return _gcs_fingerprint(_listing(spec)[2])
    folder = (
        fetch_hub(spec, _cache("hub"), BASE_FILES)[0] if form == "hub" else Path(spec).expanduser()
    )
    return _content_fingerprint(folder, _local_files(folder))


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the source is demix's own cache (never changed in place), else a copy."""
    from demix.storage import cache_dir

    if src.resolve().is_relative_to(cache_dir().resolve()):
        with contextlib.suppress(OSError):  # another file system, or no links (a FUSE mount)
            os.link(src.resolve(), dst)
            return
    shutil.copyfile(src, dst)


def write_base_artifact(spec: str, out: Path, trust_remote_code: bool = False) -> dict:
    """Write `model.base`, fetched and verified, as a demix model artifact into `out`: its
    model files and a manifest (role base) with its source, resolved revision and content
    fingerprint. An artifact already there of the same base is kept; returns the manifest.

    Raises what resolve_base raises; DataError when `out` holds what demix did not write.
    """
    from demix.checkpoint import MODEL_KIND, read_model_manifest
    from demix.storage import MANIFEST, read_manifest, staged_dir

    base = resolve_base(spec, trust_remote_code)
    out = Path(out)
    if (out / MANIFEST).is_file():
        with contextlib.suppress(DataError):
            kept = read_model_manifest(out)
            if kept.get("base_fingerprint") == base.fingerprint:
                read_manifest(out, MODEL_KIND, verify=True)
                return kept
    known = {
        rel: {"size": (base.folder / rel).stat().st_size, "sha256": digest}
        for rel, digest in base.sha256.items()
    }
    from demix.storage import write_manifest

    with staged_dir(out) as tmp:
        for rel in base.files:
            _link_or_copy(base.folder / rel, tmp / rel)
        manifest = write_manifest(
            tmp,
            MODEL_KIND,
            known_files=known,
            role="base",
            name="base",
            fingerprint=base.fingerprint,
            **base.record(),
        )
    return manifest


def base_lineage(
    spec: str | None, folder: Path | None, trust_remote_code: bool = False
) -> dict | None:
    """{"source", "revision", "fingerprint"} of `model.base` for the summary (None without
    one): as the base artifact `folder` records them, else resolved here.

    Raises what resolve_base raises.
    """
    from demix.checkpoint import read_model_manifest

    if not spec:
        return None
    recorded = read_model_manifest(folder) if folder is not None else {}
    if recorded.get("base_fingerprint") is None:
        recorded = resolve_base(spec, trust_remote_code).record()
    return {key: recorded.get(f"base_{key}") for key in ("source", "revision", "fingerprint")}
