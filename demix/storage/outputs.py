"""The output rule: demix writes only where nothing is, or where it wrote itself.

For every command, local paths and gs:// URIs alike, an output path is written only if
  - nothing is there,
  - it is an empty folder, or
  - it holds what demix wrote there: an artifact whose `manifest.json` has the expected kind,
    or a folder whose `demix-output.json` (OUTPUT_MARKER) has it;
in the last case the usual skip / resume / replace rules apply. Anything else (a regular file,
the current folder or one above it, a folder with other files, an artifact of another kind, a
gs:// prefix holding objects that are no demix artifact) is refused with one line naming the
path and why, before any work, and nothing is touched. A single-file output (evaluate --out) is
written only where nothing is or where a file demix wrote is (the command says how to tell).

OUTPUT_MARKER: artifact folders (dataset, model, checkpoint, demo data) are replaced as a whole
and need no marker, their manifest says what they are. Folders a command writes INTO (a run,
search, validate or reproduce folder) get `demix-output.json`, {"kind": "demix.run", ...},
written when the command creates or first claims the folder, before any other file; a gs://
artifact gets one too, uploaded before its old manifest is deleted, so a publish that was cut
off is still recognisably demix's.

One writer per output (`guarded_outputs`, demix.storage.locks): every output is locked before
any work and the lock is held until the command ends; a second command on it refuses naming
the holder (or waits). At publish the output is checked again (check_publish): what appeared
there meanwhile is kept and the command refuses.

What a failed command created is removed again (`guarded_outputs`), however it fails (a
DemixError, a bug, an interrupt): a folder output it claimed is removed, and one that was empty
is emptied again, unless it now holds completed work a rerun resumes from (a manifest.json, or
a search's scores.jsonl with rows); the folders it made above an output are removed once
empty. An artifact or file appears at its path only when it is published complete, so what is
found there after a failure is not the command's to remove. What was at an output path before
the command ran is never removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from demix.errors import DataError, DemixError
from demix.storage.files import (
    MANIFEST,
    PUBLISH_CHECKS,
    atomic_write_bytes,
    holds_cwd,
    publish_file,
    stop_at,
)
from demix.storage.locks import output_locks
from demix.storage.uris import check_uri, is_remote, mirror, split_gs

OUTPUT_MARKER = "demix-output.json"
# Kinds of the folders commands write into (artifact kinds are their manifests' kinds).
RUN_KIND = "demix.run"
LOCAL_RUN_KIND = "demix.local-run"  # pipeline.py run-local --out
SEARCH_KIND = "demix.search"
VALIDATE_KIND = "demix.validate"
REPRODUCE_KIND = "demix.reproduce"
DECISION_KIND = "demix.reproduce-decision"
SCORES = "scores.jsonl"  # the search's append-only table: rows are completed work
_FIX = "give a new or empty path, or move what is there away"


@dataclass(frozen=True)
class Output:
    """One path a command writes and what demix writes there.

    mode "artifact": a folder replaced as a whole, demix's when its manifest has `kind`;
    "folder": a folder written into, demix's when its OUTPUT_MARKER has `kind` (claimed with
    one before any work); "file": one file, demix's when `ours(bytes)` says so.
    """

    uri: str | Path
    kind: str | None  # None: any kind demix writes ("demix.*")
    mode: str = "artifact"
    ours: Callable[[bytes], bool] | None = None


def marker_bytes(kind: str) -> bytes:
    """The OUTPUT_MARKER content for a folder of `kind`."""
    note = "written by demix: demix writes into a non-empty folder only when this file is in it"
    return (json.dumps({"kind": kind, "note": note}, indent=2) + "\n").encode()


def _kind_of(text: bytes | None) -> str | None:
    """The "kind" of a manifest or marker, or None when it is not readable as one."""
    if text is None:
        return None
    try:
        found = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    kind = found.get("kind") if isinstance(found, dict) else None
    return kind if isinstance(kind, str) else None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError:
        return None


def _judge(where: str, output: Output, manifest: bytes | None, marker: bytes | None, names):
    """Refuse a non-empty folder that is not demix's of `output.kind`; DataError naming why."""
    kinds = {_kind_of(manifest), _kind_of(marker)} - {None}
    if output.kind in kinds or (output.kind is None and any(k.startswith("demix.") for k in kinds)):
        return
    found = _kind_of(manifest) or _kind_of(marker)
    if found and found.startswith("demix."):
        raise DataError(
            f"{where}: holds a demix {found!r} output, not {output.kind!r}; give another path"
        )
    entries = f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}"
    own = f"no {MANIFEST}" if output.mode == "artifact" else f"no {OUTPUT_MARKER}"
    raise DataError(
        f"{where}: holds {entries} demix did not write (first {names[0]!r}; {own}); demix "
        f"writes only where nothing is or where it wrote before: {_FIX}"
    )


def check_output(output: Output) -> None:
    """Refuse an output path that holds anything demix did not write there (see the module doc).

    Raises DataError naming the path and why: an unknown scheme or missing bucket, a regular
    file where a folder goes (or the reverse), the current folder or one above it, a symbolic
    link where an artifact goes, a folder or gs:// prefix with other files, an artifact of
    another kind, an unreadable folder.
    """
    check_uri(output.uri)
    if is_remote(output.uri):
        _check_remote(output)
        return
    path = Path(output.uri)
    if output.mode == "artifact" and holds_cwd(path):
        raise DataError(
            f"{output.uri}: is the current folder or one above it, which an artifact would "
            "replace; give a new folder name"
        )
    if output.mode == "artifact" and path.is_symlink():
        raise DataError(
            f"{path}: is a symbolic link; give the folder it points to or a new folder name"
        )
    if not path.exists() and not path.is_symlink():
        return
    if output.mode == "file":
        if path.is_dir():
            raise DataError(f"{path}: is a folder; give the name of the file to write")
        text = _read(path)
        if text is None or output.ours is None or not output.ours(text):
            raise DataError(f"{path}: exists and is not a file demix wrote; {_FIX}")
        return
    if not path.is_dir():
        raise DataError(f"{path}: is a file, not a folder; {_FIX}")
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as err:
        raise DataError(f"{path}: cannot list the folder ({err.strerror})") from None
    if entries:
        _judge(str(path), output, _read(path / MANIFEST), _read(path / OUTPUT_MARKER), entries)


def _check_remote(output: Output) -> None:
    from demix import gcs

    uri = str(output.uri)
    bucket, key = split_gs(uri)
    bkt = gcs.bucket(bucket)
    blobs = gcs.list_blobs(bkt, key)
    under = sorted(name[len(key) + 1 :] for name in blobs if name.startswith(f"{key}/"))
    if output.mode == "file":
        if under:
            raise DataError(f"{uri}: is a folder; give the name of the object to write")
        if key in blobs:
            text = gcs.read_bytes(bkt, key)
            if text is None or output.ours is None or not output.ours(text):
                raise DataError(f"{uri}: exists and is not an object demix wrote; {_FIX}")
        return
    if key in blobs:
        raise DataError(f"{uri}: is an object (a file), not a folder; {_FIX}")
    if under:

        def read(name: str) -> bytes | None:
            return gcs.read_bytes(bkt, f"{key}/{name}") if name in under else None

        _judge(uri, output, read(MANIFEST), read(OUTPUT_MARKER), under)


def claim_folder(uri: str | Path, kind: str) -> None:
    """Create the folder `uri` (local or gs://) with its OUTPUT_MARKER unless it has one."""
    if is_remote(uri):
        from demix import gcs

        bucket, key = split_gs(str(uri))
        if gcs.read_bytes(gcs.bucket(bucket), f"{key}/{OUTPUT_MARKER}") is None:
            write_output_bytes(f"gs://{bucket}/{key}/{OUTPUT_MARKER}", marker_bytes(kind))
        return
    path = Path(uri)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / OUTPUT_MARKER).is_file():
        atomic_write_bytes(path / OUTPUT_MARKER, marker_bytes(kind))


def holds_completed_work(path: Path) -> bool:
    """Whether a local folder holds what a rerun resumes from: a manifest, or scores rows."""
    if not path.is_dir():
        return False
    return any(path.rglob(MANIFEST)) or any(p.stat().st_size for p in path.rglob(SCORES))


class _Created:
    """What one output's path was before the command: undo() removes what the command added.

    Only what the command itself made is ever removed: a folder output it claimed (holding
    its OUTPUT_MARKER, unless it holds completed work), the contents it wrote into a folder
    output that was empty, and the folders it made above an output that are empty again. An
    artifact or a file appears at its path only when it is published complete, so a folder or
    file found there after a failure is kept, whoever wrote it.
    """

    def __init__(self, output: Output, made: Path | None = None) -> None:
        self.uri = output.uri
        self.mode = output.mode
        self.root: Path | None = None  # the topmost local folder that did not exist
        self.was_empty = False  # the output was an empty local folder (or remote prefix)
        if is_remote(self.uri):
            from demix import gcs

            bucket, key = split_gs(str(self.uri))
            self.was_empty = not gcs.list_blobs(gcs.bucket(bucket), f"{key}/")
            return
        path = Path(os.path.abspath(self.uri))
        if path.is_dir() and not path.is_symlink():
            self.was_empty = not any(path.iterdir())
            return
        if path.exists() or path.is_symlink():
            return
        while not path.parent.exists() and path.parent != path:
            path = path.parent
        self.root = made or path  # the folders made for the output's lock did not exist either

    def undo(self) -> None:
        """Remove what the failed command created here, unless it holds completed work."""
        if is_remote(self.uri):
            if self.mode != "file":
                self._undo_remote()
            return
        path = Path(os.path.abspath(self.uri))
        if self.mode != "folder":
            return  # published whole or not at all: anything there now is not ours to remove
        if self.root is not None and path.is_dir() and not path.is_symlink():
            if (path / OUTPUT_MARKER).is_file() and not holds_completed_work(path):
                shutil.rmtree(path, ignore_errors=True)
        elif self.was_empty and not holds_completed_work(path):
            for entry in path.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()

    def prune(self) -> None:
        """Remove the folders made above the output that are empty now (after the lock went)."""
        if self.root is None or is_remote(self.uri):
            return
        folder = Path(os.path.abspath(self.uri))
        if folder == self.root:
            return
        folder = folder.parent
        while folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): what is left is kept
                if folder.exists():
                    return
            if folder == self.root:
                return
            folder = folder.parent

    def _undo_remote(self) -> None:
        from demix import gcs

        bucket, key = split_gs(str(self.uri))
        local = mirror(bucket, key)  # a complete artifact whose publish failed: rerun resumes
        if not self.was_empty or holds_completed_work(local):
            return
        bkt = gcs.bucket(bucket)
        blobs = gcs.list_blobs(bkt, f"{key}/")
        if any(
            name.endswith(f"/{MANIFEST}") or (name.endswith(f"/{SCORES}") and blob.size)
            for name, blob in blobs.items()
        ):
            return
        for name in blobs:
            gcs.delete(bkt, name)
        shutil.rmtree(local, ignore_errors=True)  # the cache's copy of what was removed


# The outputs of the command running in this process: publish re-checks them (files.py's
# staged_dir for artifacts, write_output_bytes for files).
_RUNNING: dict[str, Output] = {}


def _key(uri: str | Path) -> str:
    return str(uri).rstrip("/") if is_remote(uri) else os.path.abspath(uri)


def _lockable(output: Output) -> bool:
    """Whether this process locks the output: not in a process `accelerate launch` started
    (the command that launched it holds the locks), not for a path without a name."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return False
    return is_remote(output.uri) or bool(Path(os.path.abspath(output.uri)).name)


@contextlib.contextmanager
def guarded_outputs(*outputs: Output, wait_lock: bool = False) -> Iterator[None]:
    """Lock and check every output before the block, claim folder outputs, undo them if it fails.

    Raises DataError before the block runs when an output path holds anything demix did not
    write (check_output), and LockHeld naming the holder when another command writes one of
    them (unless `wait_lock`: then it waits). When the block raises anything (a DemixError, a bug, an interrupt), what the
    command created at the outputs is removed again unless it holds completed work; the error
    is raised on unchanged. The locks are held until then.
    """
    for output in outputs:
        check_output(output)  # a plain refusal creates no lock file
    created: list[_Created] = []
    try:
        with output_locks([o.uri for o in outputs if _lockable(o)], wait_lock) as locks:
            made = {_key(lock.uri): lock.made for lock in locks}
            for output in outputs:
                check_output(output)  # again, under the lock: a writer before us may have ended
            created = [_Created(o, made.get(_key(o.uri))) for o in outputs]
            running = {_key(o.uri): o for o in outputs}
            _RUNNING.update(running)
            try:
                for output in outputs:
                    if output.mode == "folder":
                        claim_folder(output.uri, output.kind)
                stop_at("locked")
                yield
            except BaseException:
                for entry in created:
                    with contextlib.suppress(OSError, DemixError):  # the first error is shown
                        entry.undo()
                raise
            finally:
                for key in running:
                    _RUNNING.pop(key, None)
    finally:
        for entry in created:
            with contextlib.suppress(OSError):
                entry.prune()


def running_output(uri: str | Path) -> Output | None:
    """The output of the command running in this process at `uri`, if it is one."""
    return _RUNNING.get(_key(uri))


def check_publish(uri: str | Path) -> None:
    """Refuse to publish at `uri` when what is there now is not what the command may replace:
    still absent, an empty folder, or demix's of the output's kind (something that appeared
    while the command ran is kept, byte for byte).

    Raises DataError naming the path and what is there.
    """
    output = running_output(uri)
    if output is None:
        return
    try:
        check_output(output)
    except DataError as err:
        raise DataError(
            f"{err} (it appeared while this command ran; nothing was written)"
        ) from None


PUBLISH_CHECKS.append(check_publish)  # staged_dir's publish checks the running outputs too


def write_output_bytes(uri: str | Path, data: bytes) -> None:
    """Write one output file atomically to a local path, or upload it to a gs:// URI.

    An output of the running command (guarded_outputs) is re-checked first: a file that
    appeared there while it ran, and is not one demix wrote, is kept and refused.
    Raises DataError for an unknown scheme, a missing bucket, a failed upload, or such a file.
    """
    check_uri(uri)
    output = running_output(uri)
    if not is_remote(uri):
        ours = output.ours if output is not None and output.mode == "file" else None
        publish_file(uri, data, ours)
        return
    from demix import gcs

    check_publish(uri)
    bucket, key = split_gs(str(uri))
    bkt = gcs.bucket(bucket)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        gcs.upload_file(bkt, key, path)
