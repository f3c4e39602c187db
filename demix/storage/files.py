"""Local files written safely: sha256, atomic writes, artifact folders staged beside their path.

A file is written to a temporary name beside its path, fsynced and renamed over it; an
artifact folder is written into a temporary folder beside its path and renamed into place
when complete (`staged_dir`), so a reader never sees half of either.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from demix.errors import DataError

# The file that marks an artifact folder complete; written last (demix.storage.manifest).
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


def kept_json(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """compute()'s JSON value, kept in `path` stamped with `key`: a later call with the same
    key reads it back instead of computing again (another key, or a file in another form,
    computes and replaces it)."""
    if path.exists():
        kept = json.loads(path.read_text())
        if isinstance(kept, dict) and kept.get("key") == key and "value" in kept:
            return kept["value"]
    value = compute()
    atomic_write_json(path, {"key": key, "value": value})
    return value


def _remove_stale_temps(final: Path) -> None:
    """Remove temporaries a killed writer of `final` left beside it (`.<name>.*.tmp`)."""
    for stale in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def recover_replaced_dir(final: str | Path) -> None:
    """Undo a replace that a kill interrupted: `final` gone but its previous version kept.

    `staged_dir` moves the old `final` aside to `.<name>.old` before renaming the new one into
    place; a kill between the two renames leaves only the old, complete version. Put it back.
    """
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and (old / MANIFEST).is_file():
        os.replace(old, final)


def holds_cwd(path: Path) -> bool:
    """Whether `path` is the current folder or a folder above it (False when there is none)."""
    try:
        return Path.cwd().resolve().is_relative_to(path.resolve())
    except FileNotFoundError:  # the current folder was removed
        return False


def check_replaceable(final: Path) -> None:
    """Refuse to replace anything at `final` but an empty folder or an artifact (a manifest).

    Raises DataError naming `final` for the current folder or one above it, a symbolic link, a
    regular file, or a folder without a manifest that is not empty.
    """
    if holds_cwd(final):
        raise DataError(f"{final}: is the current folder or one above it; give a new folder name")
    if not final.exists() and not final.is_symlink():
        return
    if final.is_symlink() or not final.is_dir():
        what = "a symbolic link" if final.is_symlink() else "a file"
        raise DataError(f"{final}: is {what}, not an artifact folder; give a new folder name")
    if not (final / MANIFEST).is_file() and any(final.iterdir()):
        raise DataError(
            f"{final}: is a folder demix did not write (no {MANIFEST}); demix replaces only its "
            "own artifacts: give a new or empty folder, or move its files away"
        )


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`.

    On error the temporary directory is removed and `final` is left untouched. Temporaries of
    an earlier writer that was killed are removed first (one writer per artifact path). Only
    an empty folder or an artifact (a folder with a manifest) is ever replaced.
    Raises DataError naming `final`, before anything is written, for anything else there.
    """
    final = Path(final)
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced_dir(final)
    _remove_stale_temps(final)
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
