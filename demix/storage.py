"""Artifact storage: atomic writes, manifests written last, local paths and gs:// URIs alike.

An artifact directory is complete only when its `manifest.json` exists; the manifest lists
every file with its size and sha256, and readers refuse a directory without one, or one whose
files do not match it (the message names the file).

Stages work on local folders. A `gs://bucket/path` input is downloaded into a local cache
(`DEMIX_CACHE`, default ~/.cache/demix) and every file is verified against the manifest before
it is used; a `gs://` output is written to a local mirror with `staged_dir`, then uploaded file by
file (retried, resumable, crc32c-checked by demix.gcs) with the manifest uploaded LAST, after the
old manifest was deleted, so a reader never takes a partial artifact for a complete one. KFP's
`/gcs/bucket/...` paths are a FUSE mount of the same bucket and are plain local paths here.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
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
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{where}: unreadable manifest ({err})") from None
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


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`.

    On error the temporary directory is removed and `final` is left untouched. Temporaries of
    an earlier writer that was killed are removed first (one writer per artifact path).
    """
    final = Path(final)
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


# URIs: local paths (KFP's /gcs/ FUSE paths included) and gs://bucket/path.

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def is_remote(uri: str | Path) -> bool:
    """Whether `uri` is a gs:// URI (everything else that passes check_uri is a local path)."""
    return str(uri).startswith("gs://")


def check_uri(uri: str | Path) -> None:
    """Refuse a URI scheme DeMix cannot read or write (s3://, http://, ...).

    Raises DataError naming the URI and what to use instead.
    """
    match = _SCHEME.match(str(uri))
    if match and match.group(1) != "gs":
        raise DataError(
            f"{uri}: unknown scheme {match.group(1) + '://'!r}; use a local path, "
            "/gcs/BUCKET/... (KFP mount) or gs://BUCKET/..."
        )


def split_gs(uri: str) -> tuple[str, str]:
    """(bucket, object path without surrounding slashes) of a gs:// URI.

    Raises DataError for a URI without a bucket, with an invalid bucket name, or without a
    path inside the bucket.
    """
    bucket, _, key = uri.removeprefix("gs://").partition("/")
    if not bucket:
        raise DataError(f"{uri}: no bucket name; write gs://BUCKET/PATH")
    if not _BUCKET.match(bucket):
        raise DataError(f"{uri}: {bucket!r} is not a valid bucket name")
    key = key.strip("/")
    if not key:
        raise DataError(f"{uri}: give a path inside the bucket, e.g. gs://{bucket}/runs/NAME")
    return bucket, key


def cache_dir() -> Path:
    """Where remote inputs are mirrored and remote outputs staged (DEMIX_CACHE)."""
    return Path(os.environ.get("DEMIX_CACHE") or Path.home() / ".cache" / "demix")


def _mirror(bucket: str, key: str) -> Path:
    return cache_dir() / "gcs" / bucket / key


def fetch_artifact(uri: str | Path, kind: str | None = None, require_manifest: bool = True) -> Path:
    """A local, verified copy of the artifact folder `uri` (a local path or gs:// URI).

    Every listed file is checked against the manifest (size and sha256). A local folder without
    a manifest is returned as is when require_manifest is False (a plain Hugging Face model
    folder); a remote one always needs its manifest.
    Raises DataError naming the artifact or file: no manifest, wrong kind, escaping entry,
    mismatching file, unknown scheme, missing bucket.
    """
    check_uri(uri)
    if not is_remote(uri):
        root = Path(uri)
        if require_manifest or (root / MANIFEST).is_file():
            read_manifest(root, kind, verify=True)
        return root
    return _download_artifact(str(uri), kind)


def _download_artifact(uri: str, kind: str | None) -> Path:
    from demix import gcs

    bucket, key = split_gs(uri)
    bkt = gcs.bucket(bucket)
    text = gcs.read_bytes(bkt, f"{key}/{MANIFEST}")
    if text is None:
        raise DataError(
            f"{uri}: no {MANIFEST}; the artifact is missing or was not completely written"
        )
    manifest = parse_manifest(text, f"{uri}/{MANIFEST}", kind)
    local = _mirror(bucket, key)
    if (local / MANIFEST).is_file() and (local / MANIFEST).read_bytes() == text:
        with contextlib.suppress(DataError):
            read_manifest(local, kind, verify=True)
            return local  # the cached copy is this very artifact, intact
    with staged_dir(local) as tmp:
        for rel, info in manifest["files"].items():
            gcs.download_file(
                bkt.blob(f"{key}/{rel}"),
                tmp / rel,
                check=lambda path, info=info: file_mismatch(path, info),
            )
        atomic_write_bytes(tmp / MANIFEST, text)
    return local


def upload_artifact(local: str | Path, uri: str) -> int:
    """Publish the complete local artifact `local` at the gs:// URI; return files uploaded.

    The remote manifest is deleted first and uploaded last, so a reader sees either the old
    complete artifact, no artifact, or the new complete one; files already remote with the
    same size and crc32c are not sent again (an interrupted publish resumes), and objects the
    new manifest does not list are removed.
    Raises DataError when the local artifact is incomplete or corrupt, or the upload fails.
    """
    from demix import gcs

    local = Path(local)
    manifest = read_manifest(local, verify=True)  # never publish a corrupt artifact
    text = (local / MANIFEST).read_bytes()
    bucket, key = split_gs(uri)
    bkt = gcs.bucket(bucket)
    if gcs.read_bytes(bkt, f"{key}/{MANIFEST}") == text:
        return 0
    gcs.delete(bkt, f"{key}/{MANIFEST}")
    existing = gcs.list_blobs(bkt, f"{key}/")
    sent = 0
    for rel in manifest["files"]:
        name = f"{key}/{rel}"
        if not gcs.same_object(existing.get(name), local / rel):
            gcs.upload_file(bkt, name, local / rel)
            sent += 1
    wanted = {f"{key}/{rel}" for rel in manifest["files"]} | {f"{key}/{MANIFEST}"}
    for name in sorted(set(existing) - wanted):
        gcs.delete(bkt, name)
    gcs.upload_file(bkt, f"{key}/{MANIFEST}", local / MANIFEST)
    return sent + 1


@contextlib.contextmanager
def artifact_output(uri: str | Path, publish: bool = True) -> Iterator[Path]:
    """The local folder a stage writes the artifact `uri` to; published when the stage succeeds.

    A local `uri` is yielded as is. For gs://, a finished remote artifact is fetched into the
    local mirror first (so the stage can skip work already done), and the mirror is uploaded
    with upload_artifact after the block, if it then holds a complete artifact and `publish`
    (False in the other processes of a multi-process run). On error nothing is uploaded.
    Raises DataError for an unknown scheme or a missing bucket before any work is done.
    """
    check_uri(uri)
    if not is_remote(uri):
        yield Path(uri)
        return
    from demix import gcs

    uri = str(uri)
    bucket, key = split_gs(uri)
    bkt = gcs.bucket(bucket)
    if gcs.read_bytes(bkt, f"{key}/{MANIFEST}") is not None:
        _download_artifact(uri, None)
    local = _mirror(bucket, key)
    yield local
    if publish and (local / MANIFEST).is_file():
        upload_artifact(local, uri)


def checkpoint_sync(uri: str | Path) -> Callable[[Path], None] | None:
    """For a gs:// training output: fetch its newest checkpoint here, return its publisher.

    Training checkpoints beside a gs:// output live at `<uri>.ckpt`. When the remote one is
    at a later step than the local mirror's (another machine ran last), it is downloaded and
    verified first; the returned function uploads each new checkpoint (manifest last), so a
    preempted machine's successor resumes where it stopped. None for a local `uri`.
    """
    if not is_remote(uri):
        return None
    from demix import gcs

    ckpt_uri = f"{str(uri).rstrip('/')}.ckpt"
    bucket, key = split_gs(ckpt_uri)
    text = gcs.read_bytes(gcs.bucket(bucket), f"{key}/{MANIFEST}")
    if text is not None:
        remote_step = parse_manifest(text, f"{ckpt_uri}/{MANIFEST}").get("step", -1)
        local = _mirror(bucket, key)
        try:
            local_step = read_manifest(local, verify=True).get("step", -1)
        except DataError:
            local_step = -1
        if remote_step > local_step:
            _download_artifact(ckpt_uri, None)

    def publish(folder: Path) -> None:
        upload_artifact(folder, ckpt_uri)

    return publish


def discard_checkpoint(uri: str | Path) -> None:
    """Delete the published checkpoint of a finished gs:// training output (manifest first)."""
    if not is_remote(uri):
        return
    from demix import gcs

    bucket, key = split_gs(f"{str(uri).rstrip('/')}.ckpt")
    bkt = gcs.bucket(bucket)
    gcs.delete(bkt, f"{key}/{MANIFEST}")
    for name in gcs.list_blobs(bkt, f"{key}/"):
        gcs.delete(bkt, name)


def fetch_files(uri: str | Path) -> Path:
    """A local copy of raw input files: a local path as is, or a gs:// object or folder.

    Remote objects are downloaded into the cache (crc32c- and size-checked); copies already
    cached with the same crc32c are kept as they are.
    Raises DataError for an unknown scheme, a missing bucket, or nothing at the URI.
    """
    check_uri(uri)
    if not is_remote(uri):
        return Path(uri)
    from demix import gcs

    uri = str(uri)
    bucket, key = split_gs(uri)
    bkt = gcs.bucket(bucket)
    blobs = gcs.list_blobs(bkt, key)
    local = _mirror(bucket, key)
    if key in blobs:
        _fetch_blob(blobs[key], local)
        return local
    under = {
        name[len(key) + 1 :]: blob
        for name, blob in blobs.items()
        if name.startswith(f"{key}/") and not name.endswith("/")
    }
    if not under:
        raise DataError(f"{uri}: no such object or folder in gs://{bucket}")
    for rel, blob in sorted(under.items()):
        _fetch_blob(blob, local / check_manifest_entry(rel, uri))
    for stale in set(list_files(local)) - set(under):
        (local / stale).unlink()
    return local


def remote_files(uri: str) -> list[tuple[str, int, str]]:
    """(gs:// URI, size, crc32c) of the object `uri`, or of every object under the folder `uri`.

    Listed without downloading anything; a folder's objects sorted by their path under it.
    Raises DataError for an unknown scheme, a missing bucket, or nothing at the URI.
    """
    check_uri(uri)
    from demix import gcs

    bucket, key = split_gs(uri)
    blobs = gcs.list_blobs(gcs.bucket(bucket), key)
    if key in blobs:
        return [(uri, int(blobs[key].size), str(blobs[key].crc32c))]
    under = {
        check_manifest_entry(name[len(key) + 1 :], uri): blob
        for name, blob in blobs.items()
        if name.startswith(f"{key}/") and not name.endswith("/")
    }
    if not under:
        raise DataError(f"{uri}: no such object or folder in gs://{bucket}")
    return [
        (f"gs://{bucket}/{key}/{rel}", int(blob.size), str(blob.crc32c))
        for rel, blob in sorted(under.items(), key=lambda item: PurePosixPath(item[0]))
    ]


def _fetch_blob(blob, dest: Path) -> None:
    from demix import gcs

    if dest.is_file() and gcs.same_object(blob, dest):
        return
    size = blob.size

    def check(path: Path) -> str | None:
        actual = path.stat().st_size
        return None if actual == size else f"size {actual} != {size} listed by the bucket"

    gcs.download_file(blob, dest, check=check)


@contextlib.contextmanager
def synced_folder(uri: str | Path) -> Iterator[Path]:
    """A local folder mirroring gs:// folder `uri` (a local `uri` is yielded as is).

    For folders that grow while a stage runs (the search's append-only scores table): remote
    files missing locally are fetched first (a local copy is this machine's newer state), and
    every local file that differs is uploaded afterwards, also when the stage fails, so
    completed rows are not lost.
    Raises DataError for an unknown scheme or a missing bucket.
    """
    check_uri(uri)
    if not is_remote(uri):
        yield Path(uri)
        return
    from demix import gcs

    uri = str(uri)
    bucket, key = split_gs(uri)
    bkt = gcs.bucket(bucket)
    local = _mirror(bucket, key)
    for name, blob in gcs.list_blobs(bkt, f"{key}/").items():
        dest = local / check_manifest_entry(name[len(key) + 1 :], uri)
        if not dest.exists():  # a local copy is this machine's newer state (uploaded from it)
            _fetch_blob(blob, dest)
    local.mkdir(parents=True, exist_ok=True)
    try:
        yield local
    finally:
        existing = gcs.list_blobs(bkt, f"{key}/")
        for rel in list_files(local):
            if not gcs.same_object(existing.get(f"{key}/{rel}"), local / rel):
                gcs.upload_file(bkt, f"{key}/{rel}", local / rel)


def write_output_bytes(uri: str | Path, data: bytes) -> None:
    """Write one output file atomically to a local path, or upload it to a gs:// URI.

    Raises DataError for an unknown scheme, a missing bucket or a failed upload.
    """
    check_uri(uri)
    if not is_remote(uri):
        atomic_write_bytes(uri, data)
        return
    from demix import gcs

    bucket, key = split_gs(str(uri))
    bkt = gcs.bucket(bucket)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        gcs.upload_file(bkt, key, path)


def checkpoint_sync_into(uri: str | Path, local: str | Path) -> Callable[[Path], None] | None:
    """checkpoint_sync for a training output written at a local path that is not the cache's
    mirror of `uri` (a pipeline task's `model.path`): the newest checkpoint at `<uri>.ckpt` is
    fetched into `local` (the loop's `<out>.ckpt`) when it is at a later step than `local`'s,
    and the returned function publishes each new checkpoint there. None for a local `uri`.

    Raises DataError for a missing bucket, or a published checkpoint that never arrives intact.
    """
    if not is_remote(uri):
        return None
    from demix import gcs

    ckpt_uri = f"{str(uri).rstrip('/')}.ckpt"
    bucket, key = split_gs(ckpt_uri)
    bkt = gcs.bucket(bucket)
    text = gcs.read_bytes(bkt, f"{key}/{MANIFEST}")
    if text is not None:
        remote = parse_manifest(text, f"{ckpt_uri}/{MANIFEST}")
        try:
            local_step = read_manifest(local, verify=True).get("step", -1)
        except DataError:
            local_step = -1
        if remote.get("step", -1) > local_step:
            with staged_dir(local) as tmp:
                for rel, info in remote["files"].items():
                    gcs.download_file(
                        bkt.blob(f"{key}/{rel}"),
                        tmp / rel,
                        check=lambda path, info=info: file_mismatch(path, info),
                    )
                atomic_write_bytes(tmp / MANIFEST, text)

    def publish(folder: Path) -> None:
        upload_artifact(folder, ckpt_uri)

    return publish
