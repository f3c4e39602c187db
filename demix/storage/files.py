"""Local files written safely: sha256, atomic writes, artifact folders staged beside their path.

A file is written to a temporary name beside its path, fsynced and renamed over it; an
artifact folder is written into a temporary folder beside its path and renamed into place
when complete (`staged_dir`), so a reader never sees half of either.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from demix.errors import DataError

# The file that marks an artifact folder complete; written last (demix.storage.manifest).
MANIFEST = "manifest.json"


def stop_at(point: str) -> None:
    """Stop this process (SIGSTOP) at the named point when DEMIX_STOP_AT names it, the first
    time it is reached: a test (or a person debugging) forces an interleaving with another
    command there, then continues it with SIGCONT. Points: "locked" (outputs locked and
    checked, no work done), "publish" (an artifact or output file complete, not yet renamed
    into place)."""
    if point in os.environ.get("DEMIX_STOP_AT", "").split(",") and point not in _STOPPED:
        _STOPPED.add(point)
        os.kill(os.getpid(), signal.SIGSTOP)


_STOPPED: set[str] = set()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def owner_tag() -> str:
    """This process in the names of its temporaries: `<pid>-<8 hex of the host name>`."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f"{os.getpid()}-{host}"


# What follows a temporary's prefix: its owner's tag and tempfile's random part, or the random
# part alone (named before temporaries carried their owner); `.tmp` for staged files/folders.
_TAGGED = re.compile(r"(\d+)-([0-9a-f]{8})\.[a-z0-9_]+(?:\.tmp)?")
_UNTAGGED = re.compile(r"[a-z0-9_]+(?:\.tmp)?")


def is_stale(rest: str) -> bool:
    """Whether a temporary whose name continues with `rest` after its prefix was left by a
    process that is gone: one of this host whose pid no longer runs, or one named before
    temporaries carried their owner. Another live process's temporary is not stale, nor one
    of another path that shares the prefix (`.model.ckpt.*.tmp` beside `model`).
    """
    found = _TAGGED.fullmatch(rest)
    if found is None:
        return bool(_UNTAGGED.fullmatch(rest))
    if found.group(2) != owner_tag().split("-")[1]:
        return False  # another host's, on a shared file system: it may still run
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _write_temp(path: Path, data: bytes) -> str:
    """`data` in a new fsynced temporary file beside `path`; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp"
    )
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; artifacts are shared between users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename over `path`."""
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def publish_file(path: str | Path, data: bytes, ours: Callable[[bytes], bool] | None) -> None:
    """Write the output file `path` atomically, but only where nothing is or where `ours` says
    demix wrote what is there (None: replace whatever is there, atomic_write_bytes).

    The check is made at the rename: a file that appeared while the command ran is kept.
    Raises DataError naming `path` when something else is there.
    """
    if ours is None:
        atomic_write_bytes(path, data)
        return
    path = Path(path)
    tmp = _write_temp(path, data)
    stop_at("publish")
    try:
        try:
            os.link(tmp, path)  # creates `path` only if nothing is there, atomically
            return
        except FileExistsError:
            pass
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                mine = stat.S_ISREG(os.fstat(f.fileno()).st_mode) and ours(f.read())
        except OSError:
            mine = False
        if not mine:
            raise DataError(
                f"{path}: appeared while this command ran and is not a file demix wrote; it is "
                "kept as it is and nothing was written: move it away or give another path"
            )
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def open_append(path: str | Path):
    """`path` opened for appending as a binary file, created if missing, without following a
    symbolic link: the files demix appends to (scores tables) are regular files it made.

    Raises DataError naming `path` when it is a symbolic link or not a regular file.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO put there fails at once instead of waiting for a reader
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError(
                f"{path}: is a symbolic link; demix appends only to a regular file it created "
                "there: remove the link"
            ) from None
        raise DataError(f"{path}: cannot open it to append ({err.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{path}: is not a regular file; demix appends only to a file it created")
    return os.fdopen(fd, "ab")


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
    """Remove temporaries a killed writer of `final` left beside it (`.<name>.*.tmp`); those of
    a writer that still runs are its own (is_stale)."""
    prefix = f".{final.name}."
    for stale in final.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        if not is_stale(stale.name[len(prefix) :]):
            continue
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


# The running command's own check of an output at publish (demix.storage.outputs registers
# check_publish here: outputs builds on this module, not the reverse).
PUBLISH_CHECKS: list[Callable[[Path], None]] = []


def _check_publish(final: Path) -> None:
    """Refuse to publish over what appeared at `final` while the command ran: anything but an
    empty folder or an artifact (check_replaceable), or, for an output of the running command,
    an artifact of another kind (demix.storage.outputs.check_publish)."""
    try:
        check_replaceable(final)
    except DataError as err:
        raise DataError(
            f"{err} (it appeared while this command ran; nothing was written)"
        ) from None
    for check in PUBLISH_CHECKS:
        check(final)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`.

    On error the temporary directory is removed and `final` is left untouched. Temporaries of
    an earlier writer that was killed are removed first (one writer per artifact path; a live
    writer's are its own). Only an empty folder or an artifact (a folder with a manifest) is
    ever replaced, checked before the block and again at the rename.
    Raises DataError naming `final`, before anything is written, for anything else there, and
    after the block (nothing published) for anything else that appeared there meanwhile.
    """
    final = Path(final)
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_replaced_dir(final)
    _remove_stale_temps(final)
    tmp = Path(
        tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{owner_tag()}.", suffix=".tmp")
    )
    tmp.chmod(0o755)
    try:
        yield tmp
        stop_at("publish")
        _check_publish(final)
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
