"""Artifact manifests: written last, listing every file's size and sha256; read and verified.

An artifact directory is complete only when its `manifest.json` exists; readers refuse a
directory without one, or one whose files do not match it (the message names the file).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from demix.errors import DataError
from demix.storage.files import MANIFEST, atomic_write_json, sha256_file


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
    for rel in list_files(root):
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
    if sha256_file(path) != info.get("sha256"):
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
    return manifest


def read_manifest(root: str | Path, kind: str | None = None, verify: bool = False) -> dict:
    """Read an artifact's manifest; refuse a missing one, a wrong kind or escaping paths.

    With verify=True also check every listed file's size and sha256.
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
    for rel, info in manifest.get("files", {}).items():
        target = _safe_relpath(root, rel)
        if verify and (reason := file_mismatch(target, info)):
            raise DataError(f"{target}: {reason}; the artifact is corrupt, write it again")
    return manifest
