"""Artifact manifests: written last, listing every file's size and sha256; read and verified.

An artifact directory is complete only when its `manifest.json` exists, and it is exactly what
its manifest lists: readers refuse a directory without one, a listed file that is missing or
whose size or sha256 differs, a file or symlink the manifest does not list, a symlink that
leads outside, and an entry that is absolute or leaves the folder (each message names the
artifact and the file). Only demix's own files beside the content are not listed
(`is_demix_file`: the manifest, the output marker, and `.demix*` names such as locks).
Manifest fields are checked against the schema of their kind (demix.storage.schema).

Verifying is cheap enough for every reader to do it every time: sizes are always checked, each
file is hashed once per process (`sha256_once`, keyed by inode, size and times, so a file
replaced or rewritten is hashed again).
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path, PurePosixPath
from typing import Any

from demix.errors import DataError
from demix.storage.files import MANIFEST, atomic_write_json, sha256_file
from demix.storage.outputs import OUTPUT_MARKER
from demix.storage.schema import check_manifest_fields

# demix's own files in an artifact's folder, never listed in its manifest nor refused: the
# manifest, the output marker, and names starting with DEMIX_PREFIX (locks, download records).
DEMIX_FILES = (MANIFEST, OUTPUT_MARKER)
DEMIX_PREFIX = ".demix"
# A file modified this recently may still change within its timestamps' granularity: its hash
# is not kept (as git treats "racily clean" files).
_RACY_NS = 2_000_000_000
# (path, device, inode, size, mtime_ns, ctime_ns) -> sha256, for this process
_HASHES: dict[tuple, str] = {}


def is_demix_file(rel: str) -> bool:
    """Whether an artifact-relative path is one of demix's own files (never listed)."""
    return rel in DEMIX_FILES or rel.rsplit("/", 1)[-1].startswith(DEMIX_PREFIX)


def sha256_once(path: Path) -> str:
    """sha256 of a file, hashed once per process while its inode, size and times stay the
    same."""
    path = Path(path)
    before = path.stat()
    key = (
        str(path.absolute()),
        before.st_dev,
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
        before.st_ctime_ns,
    )
    if key in _HASHES:
        return _HASHES[key]
    started = time.time_ns()
    digest = sha256_file(path)
    if before.st_mtime_ns < started - _RACY_NS:
        _HASHES[key] = digest
    return digest


def artifact_entries(root: Path) -> dict[str, str]:
    """Every entry of an artifact folder but demix's own, not following symlinks: relative
    POSIX path -> "file", "symlink" or "other" (a fifo, a socket, a device)."""
    out: dict[str, str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        base = Path(folder)
        rels = {name: (base / name).relative_to(root).as_posix() for name in dirs + files}
        dirs[:] = [d for d in dirs if not is_demix_file(rels[d])]  # nothing under them counts
        for name in files + [d for d in dirs if (base / d).is_symlink()]:
            if is_demix_file(rels[name]):
                continue
            mode = os.lstat(base / name).st_mode
            out[rels[name]] = (
                "symlink" if stat.S_ISLNK(mode) else "file" if stat.S_ISREG(mode) else "other"
            )
    return out


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of all regular files under root, except the manifest, sorted."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            out.append(p.relative_to(root).as_posix())
    return out


def write_manifest(
    root: str | Path, kind: str, known_files: dict[str, dict] | None = None, **fields: Any
) -> dict:
    """Write `manifest.json` last: kind, extra fields, and every file's size and sha256.

    `known_files` {rel: {"size", "sha256"}} are hashes the writer computed while writing (a file
    whose size differs from its entry is hashed again); every other file is hashed here.
    """
    root = Path(root)
    known_files = known_files or {}
    files = {}
    for rel in sorted(r for r in artifact_entries(root) if (root / r).is_file()):
        size = (root / rel).stat().st_size
        entry = known_files.get(rel)
        if entry is None or entry["size"] != size:
            entry = {"size": size, "sha256": sha256_file(root / rel)}
        files[rel] = {"size": size, "sha256": entry["sha256"]}
    manifest = {"kind": kind, **fields, "files": files}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def check_manifest_entry(rel: object, where: str) -> str:
    """A manifest's file entry must be a relative POSIX path inside the artifact.

    Raises DataError naming the manifest and the entry for an absolute path, `..`, or junk.
    """
    path = PurePosixPath(rel) if isinstance(rel, str) else None
    if (
        path is None
        or not rel
        or "\\" in rel
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in rel.split("/"))
    ):
        raise DataError(f"{where}: file entry {rel!r} escapes the artifact directory")
    return rel


def _safe_relpath(root: Path, rel: str) -> Path:
    check_manifest_entry(rel, str(root / MANIFEST))
    target = (root / rel).resolve()  # also catches a symlink that points outside
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"{root / MANIFEST}: file entry {rel!r} escapes the artifact directory")
    return target


def file_mismatch(path: Path, info: dict) -> str | None:
    """Why `path` does not match its manifest entry {"size", "sha256"}, or None when it does."""
    if not path.is_file():
        return f"listed in {MANIFEST} but missing"
    size = path.stat().st_size
    if size != info.get("size"):
        return f"size {size} != {info.get('size')} in {MANIFEST}"
    if sha256_once(path) != info.get("sha256"):
        return f"sha256 does not match {MANIFEST}"
    return None


def parse_manifest(text: bytes | str, where: str, kind: str | None = None) -> dict:
    """Parse manifest JSON and check its kind and file entries (sizes, hashes, no escapes).

    Raises DataError naming `where` for unreadable JSON, a wrong kind or a bad entry.
    """
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:  # also too deep, or a number too long
        reason = "nested too deeply" if isinstance(err, RecursionError) else err
        raise DataError(f"{where}: unreadable manifest ({reason})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise DataError(f"{where}: a manifest is a JSON object with a 'files' mapping")
    if kind is not None and manifest.get("kind") != kind:
        raise DataError(
            f"{where}: expected an artifact of kind {kind!r}, found {manifest.get('kind')!r}"
        )
    for rel, info in manifest.get("files", {}).items():
        check_manifest_entry(rel, where)
        if not isinstance(info, dict) or not {"size", "sha256"} <= set(info):
            raise DataError(f"{where}: file entry {rel!r} needs a size and a sha256")
    check_manifest_fields(manifest, where)
    if "tokenizer" in manifest:  # a folder of the artifact: a relative path inside it
        check_manifest_entry(manifest["tokenizer"], f"{where}: field 'tokenizer'")
    return manifest


def read_manifest(root: str | Path, kind: str | None = None, verify: bool = False) -> dict:
    """Read an artifact's manifest; refuse a missing one, a wrong kind, a field of the wrong
    type or value, or an entry that escapes the folder.

    With verify=True also check that the folder is exactly what the manifest lists
    (`verify_artifact`): what every reader of an artifact's files does before using them.
    Raises DataError naming the directory or file at fault.
    """
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{root}: no {MANIFEST}; the artifact is missing or was not completely written"
        )
    try:
        text = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: unreadable manifest ({err.strerror})") from None
    manifest = parse_manifest(text, str(path), kind)
    for rel in manifest.get("files", {}):
        _safe_relpath(root, rel)
    if verify:
        verify_artifact(root, manifest)
    return manifest


def verify_artifact(root: Path, manifest: dict) -> None:
    """Check that the artifact folder `root` is exactly its (parsed) manifest: no file or
    symlink it does not list, every listed file there, inside the folder, of its size and
    sha256 (hashed once per process: sha256_once).

    Raises DataError naming the artifact and the file.
    """
    listed = manifest.get("files", {})
    fix = "the artifact was changed after it was written; write it again"
    for rel, what in sorted(artifact_entries(root).items()):
        if rel not in listed:
            thing = {"file": "a file", "symlink": "a symlink"}.get(what, "a special file")
            raise DataError(f"{root / rel}: {thing} not listed in {root / MANIFEST}; {fix}")
        if what == "other":
            raise DataError(f"{root / rel}: not a regular file; {fix}")
    for rel, info in listed.items():
        target = _safe_relpath(root, rel)
        if reason := file_mismatch(target, info):
            raise DataError(f"{root / rel}: {reason}; the artifact is corrupt, write it again")
