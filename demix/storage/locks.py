"""One writer per output: an exclusive lock per output path, held from before any work to exit.

A local output `<out>` is locked with `fcntl.flock` on the file `<out>.demix-lock` beside it,
which holds the holder's `pid@host`. The kernel drops a flock when its process dies, so the lock
of a killed command is simply free: the next command takes it over (and says whose it was). The
file is removed at release; a command that opened it just before (and so holds a removed file's
lock) sees that its file is no longer the one at the path and tries again.

A gs:// output `gs://b/<key>` is locked with the object `<key>.demix-lock`, created only if it
does not exist (`if_generation_match=0`), holding `pid@host`, rewritten every heartbeat_s()
while held and deleted at release. A lock object of a dead process on this host, or one not
rewritten for stale_s() (its machine is gone: a preempted pod's successor runs on another
host), is taken over.

A second command on a locked output refuses with one line naming the holder (LockHeld), or,
with `wait`, waits for it. Locks are counted per process, so a command that locks an output
and then calls code that locks it again does not lock itself out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from demix.errors import DataError
from demix.storage.uris import is_remote, split_gs

LOCK_SUFFIX = ".demix-lock"
_HELD: dict[str, int] = {}  # lock path -> how many times this process holds it
# File systems without flock (some FUSE mounts) answer these: the output goes unlocked.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
log = logging.getLogger(__name__)


class LockHeld(DataError):
    """Another command writes the same output (its lock names the holder, pid@host)."""


def holder() -> str:
    """This process as a lock names it: pid@host."""
    return f"{os.getpid()}@{socket.gethostname()}"


def lock_path(uri: str | Path) -> str:
    """The lock beside the output `uri`: `<uri>.demix-lock` (local path or gs:// URI)."""
    if is_remote(uri):
        return f"{str(uri).rstrip('/')}{LOCK_SUFFIX}"
    return os.path.abspath(uri) + LOCK_SUFFIX


def _alive_here(owner: str) -> bool:
    """Whether `owner` (pid@host) may still run: True unless it is a dead pid of this host."""
    pid, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class OutputLock:
    """The exclusive lock of one output path; `made` is the topmost folder created for it."""

    def __init__(self, uri: str | Path, wait: bool = False) -> None:
        self.uri = uri
        self.path = lock_path(uri)
        self.wait = wait
        self.made: Path | None = None
        self._fd: int | None = None
        self._generation: int | None = None  # of the gs:// lock object this process holds
        self._stop = threading.Event()  # ends the gs:// lock's heartbeat
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock. Raises LockHeld naming the holder when another command holds it (and
        `wait` is off), DataError when the lock cannot be created."""
        if _HELD.get(self.path):
            _HELD[self.path] += 1
            return
        if is_remote(self.uri):
            self._acquire_remote()
        else:
            self._acquire_local()
        _HELD[self.path] = 1

    def release(self) -> None:
        """Give the lock back and remove its file or object (the last release in this process)."""
        if not _HELD.get(self.path):
            return
        _HELD[self.path] -= 1
        if _HELD[self.path]:
            return
        del _HELD[self.path]
        if is_remote(self.uri):
            self._release_remote()
        elif self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)  # unlinked first: a waiter then sees a stale file and retries
            self._fd = None

    # ------------------------------------------------------------ local: flock beside the path

    def _acquire_local(self) -> None:
        path = Path(self.path)
        missing = path.parent
        while not missing.parent.exists() and missing.parent != missing:
            missing = missing.parent
        if not path.parent.exists():
            self.made = missing
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(
                f"{path.parent}: cannot create the output's folder ({err.strerror})"
            ) from None
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise DataError(
                    f"{path}: cannot create the output's lock file ({err.strerror}); remove "
                    "what is there or give another output path"
                ) from None
            if not self._flock(fd):
                os.close(fd)
                return  # no locking on this file system
            try:
                same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder released and removed it meanwhile: lock the new file
        previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if previous:
            log.warning(
                "%s: took over the lock of %s, which no longer runs (its command was killed)",
                self.uri,
                previous,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder() + "\n").encode(), 0)
        self._fd = fd

    def _flock(self, fd: int) -> bool:
        """flock `fd` exclusively; False when the file system has no flock. Raises LockHeld."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            owner = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another command"
            os.close(fd)
            raise LockHeld(
                f"{self.uri}: another demix command ({owner}) is writing this output; wait for "
                "it to finish (or rerun with --wait-lock), or give another output path"
            ) from None
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            log.warning("%s: this file system has no file locks; not locked", self.uri)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return False
        return True

    # ------------------------------------------------------------ gs://: a create-only object

    def _acquire_remote(self) -> None:
        from google.api_core import exceptions

        from demix import gcs

        bucket, key = split_gs(self.path)
        bkt = gcs.bucket(bucket)
        while True:
            blob = bkt.blob(key)
            try:
                blob.upload_from_string(
                    holder() + "\n", if_generation_match=0, retry=gcs.retry_policy()
                )
                self._held_remote(blob)
                return
            except exceptions.PreconditionFailed:
                pass
            except Exception as err:  # noqa: BLE001 (retries exhausted: the upload fails later)
                log.warning(
                    "%s: cannot create the lock object %s (%s); going on unlocked",
                    self.uri,
                    self.path,
                    type(err).__name__,
                )
                return
            found = bkt.get_blob(key, retry=gcs.retry_policy())
            if found is None:
                continue  # released meanwhile
            owner = (gcs.read_bytes(bkt, key) or b"").decode(errors="replace").strip()
            if owner == holder():  # our own create, retried after its answer was lost
                self._held_remote(found)
                return
            age = time.time() - found.updated.timestamp() if found.updated else 0.0
            if not _alive_here(owner) or age > stale_s():
                why = "no longer runs" if not _alive_here(owner) else f"silent for {age:.0f} s"
                with contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
                    found.delete(if_generation_match=found.generation, retry=gcs.retry_policy())
                log.warning(
                    "%s: took over the lock of %s, which %s (its command was killed)",
                    self.uri,
                    owner or "unknown",
                    why,
                )
                continue
            if not self.wait:
                raise LockHeld(
                    f"{self.uri}: another demix command ({owner or 'unknown'}) is writing this "
                    f"output (lock {self.path}); wait for it to finish (or rerun with "
                    "--wait-lock), or give another output path"
                )
            time.sleep(2.0)  # polling a bucket: nothing to block on

    def _held_remote(self, blob) -> None:
        """Keep the lock object fresh while it is held: a holder that stops refreshing it (a
        machine gone with its process) loses it after stale_s()."""
        self._generation = blob.generation or -1
        self._beat = threading.Thread(target=self._heartbeat, args=(blob,), daemon=True)
        self._beat.start()

    def _heartbeat(self, blob) -> None:
        while not self._stop.wait(heartbeat_s()):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next one
                self.refresh(blob)

    def refresh(self, blob) -> None:
        """Rewrite the held lock object `blob` (one heartbeat), only while it is still ours: a
        holder whose lock was taken over never writes over the new holder's."""
        from demix import gcs

        match = self._generation if self._generation and self._generation > 0 else None
        blob.upload_from_string(
            holder() + "\n", if_generation_match=match, retry=gcs.retry_policy()
        )
        self._generation = blob.generation or self._generation

    def _release_remote(self) -> None:
        from demix import gcs

        if self._generation is None:  # went on unlocked: the object (if any) is not ours
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        bucket, key = split_gs(self.path)
        with contextlib.suppress(DataError):
            gcs.delete(gcs.bucket(bucket), key)


def heartbeat_s() -> float:
    """Seconds between refreshes of a held gs:// lock (DEMIX_LOCK_HEARTBEAT_S, default 60)."""
    return float(os.environ.get("DEMIX_LOCK_HEARTBEAT_S", "60"))


def stale_s() -> float:
    """A gs:// lock not refreshed for this long is taken over (DEMIX_LOCK_STALE_S, default
    five heartbeats): its holder's machine is gone (a preempted pod, a deleted VM)."""
    return float(os.environ.get("DEMIX_LOCK_STALE_S", str(5 * heartbeat_s())))


@contextlib.contextmanager
def output_locks(uris: list[str | Path], wait: bool = False) -> Iterator[list[OutputLock]]:
    """Hold the locks of every output in `uris` (taken in a fixed order) for the block.

    Raises LockHeld naming the holder when another command holds one (none is then held).
    """
    locks = [OutputLock(uri, wait) for uri in uris]
    taken: list[OutputLock] = []
    try:
        for lock in sorted(locks, key=lambda lock: lock.path):
            lock.acquire()
            taken.append(lock)
        yield locks
    finally:
        for lock in reversed(taken):
            lock.release()
