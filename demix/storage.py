"""Artifact storage: atomic writes and manifests written last.

An artifact directory is complete only when its `manifest.json` exists; the manifest lists
every file with its size and sha256, and readers refuse a directory without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from demix.errors import DataError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; artifacts are shared between users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write JSON (sorted keys are not forced: insertion order is kept)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of all regular files under root, except the manifest, sorted."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            out.append(p.relative_to(root).as_posix())
    return out


def write_manifest(root: str | Path, kind: str, **fields: Any) -> dict:
    """Write `manifest.json` last: kind, extra fields, and every file's size and sha256."""
    root = Path(root)
    files = {
        rel: {"size": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
        for rel in list_files(root)
    }
    manifest = {"kind": kind, **fields, "files": files}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def _safe_relpath(root: Path, rel: str) -> Path:
    target = (root / rel).resolve()
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"{root / MANIFEST}: file entry {rel!r} escapes the artifact directory")
    return target


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
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable manifest ({err})") from None
    if kind is not None and manifest.get("kind") != kind:
        raise DataError(
            f"{path}: expected an artifact of kind {kind!r}, found {manifest.get('kind')!r}"
        )
    for rel, info in manifest.get("files", {}).items():
        target = _safe_relpath(root, rel)
        if not verify:
            continue
        if not target.is_file():
            raise DataError(f"{target}: listed in {MANIFEST} but missing")
        if target.stat().st_size != info["size"]:
            raise DataError(
                f"{target}: size {target.stat().st_size} != {info['size']} in {MANIFEST}"
            )
        if sha256_file(target) != info["sha256"]:
            raise DataError(f"{target}: sha256 does not match {MANIFEST}")
    return manifest


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`.

    On error the temporary directory is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
