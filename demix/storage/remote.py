"""gs:// artifacts and folders: fetched into the local mirror verified, published manifest last.

A `gs://bucket/path` input is downloaded into the local cache and every file is verified
against the manifest before it is used; a `gs://` output is written to the local mirror with
`staged_dir`, then uploaded file by file (retried, resumable, crc32c-checked by demix.gcs) with
the manifest uploaded LAST, after the old manifest was deleted, so a reader never takes a
partial artifact for a complete one. A local path is used as it is.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from demix.errors import DataError
from demix.storage.files import MANIFEST, atomic_write_bytes, staged_dir, stop_at
from demix.storage.manifest import (
    check_manifest_entry,
    file_mismatch,
    list_files,
    parse_manifest,
    read_manifest,
)
from demix.storage.outputs import (
    OUTPUT_MARKER,
    Output,
    check_output,
    check_publish,
    marker_bytes,
)
from demix.storage.uris import check_uri, is_remote, mirror, split_gs


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


def fetch_manifest(uri: str | Path, kind: str | None = None) -> dict:
    """The manifest of the artifact `uri` (a local path or gs:// URI), read alone: no other
    file of the artifact is fetched or verified (a reader that needs only its fields).

    Raises DataError naming the artifact: no manifest, wrong kind, unknown scheme.
    """
    check_uri(uri)
    if not is_remote(uri):
        return read_manifest(Path(uri), kind)
    from demix import gcs

    bucket, key = split_gs(str(uri))
    text = gcs.read_bytes(gcs.bucket(bucket), f"{key}/{MANIFEST}")
    if text is None:
        raise DataError(
            f"{uri}: no {MANIFEST}; the artifact is missing or was not completely written"
        )
    return parse_manifest(text, f"{uri}/{MANIFEST}", kind)


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
    local = _artifact_mirror(bucket, key)
    if (local / MANIFEST).is_file() and (local / MANIFEST).read_bytes() == text:
        with contextlib.suppress(DataError):
            read_manifest(local, kind, verify=True)
            return local  # the cached copy is this very artifact, intact
    _download_files(bkt, key, manifest, text, local)
    return local


def _download_files(bkt, key: str, manifest: dict, text: bytes, local: Path) -> None:
    """Every file of a published artifact into `local` (staged, each checked against the
    manifest, the manifest last)."""
    from demix import gcs

    with staged_dir(local) as tmp:
        for rel, info in manifest["files"].items():
            gcs.download_file(
                bkt.blob(f"{key}/{rel}"),
                tmp / rel,
                check=lambda path, info=info: file_mismatch(path, info),
            )
        atomic_write_bytes(tmp / MANIFEST, text)


def _artifact_mirror(bucket: str, key: str) -> Path:
    """The cache folder an artifact gs://bucket/key is mirrored in, cleared of anything else.

    The cache is demix's own: a folder there that is no artifact (raw files fetched from the
    same URI, a synced folder) is removed so the artifact can be staged in its place.
    """
    local = mirror(bucket, key)
    if local.is_symlink() or (local.exists() and not (local / MANIFEST).is_file()):
        if local.is_dir() and not local.is_symlink():
            shutil.rmtree(local)
        else:
            local.unlink()
    return local


def upload_artifact(local: str | Path, uri: str) -> int:
    """Publish the complete local artifact `local` at the gs:// URI; return files uploaded.

    The remote manifest is deleted first and uploaded last, so a reader sees either the old
    complete artifact, no artifact, or the new complete one; files already remote with the
    same size and crc32c are not sent again (an interrupted publish resumes), and objects the
    new manifest does not list are removed. An OUTPUT_MARKER of the artifact's kind goes up
    before anything else, so a publish cut off between manifests is still demix's output.
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
    existing = gcs.list_blobs(bkt, f"{key}/")
    marker = f"{key}/{OUTPUT_MARKER}"
    if marker not in existing:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / OUTPUT_MARKER).write_bytes(marker_bytes(manifest["kind"]))
            gcs.upload_file(bkt, marker, Path(tmp) / OUTPUT_MARKER)
    gcs.delete(bkt, f"{key}/{MANIFEST}")
    sent = 0
    for rel in manifest["files"]:
        name = f"{key}/{rel}"
        if not gcs.same_object(existing.get(name), local / rel):
            gcs.upload_file(bkt, name, local / rel)
            sent += 1
    wanted = {f"{key}/{rel}" for rel in manifest["files"]} | {f"{key}/{MANIFEST}", marker}
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
    Raises DataError before any work is done for an unknown scheme, a missing bucket, or a
    gs:// prefix holding objects that are no demix artifact (check_output).
    """
    check_uri(uri)
    if not is_remote(uri):
        yield Path(uri)
        return
    from demix import gcs

    uri = str(uri)
    check_output(Output(uri, kind=None))
    bucket, key = split_gs(uri)
    bkt = gcs.bucket(bucket)
    if gcs.read_bytes(bkt, f"{key}/{MANIFEST}") is not None:
        _download_artifact(uri, None)
    local = _artifact_mirror(bucket, key)
    yield local
    if publish and (local / MANIFEST).is_file():
        stop_at("publish")
        check_publish(uri)  # what appeared at the URI while the stage ran is kept
        upload_artifact(local, uri)


def checkpoint_sync(
    uri: str | Path, local: str | Path | None = None
) -> Callable[[Path], None] | None:
    """For a gs:// training output: fetch its newest checkpoint here, return its publisher.

    Training checkpoints beside a gs:// output live at `<uri>.ckpt`. When the remote one is
    at a later step than the local one (another machine or pod ran last), it is downloaded and
    verified first into `local`: the loop's `<out>.ckpt` (default: the cache's mirror of the
    checkpoint, where `demix train --out gs://...` trains; a pipeline task passes the folder
    beside its `model.path`). The returned function uploads each new checkpoint (manifest
    last), so a preempted machine's successor resumes where it stopped. None for a local `uri`.
    Raises DataError for a missing bucket or a published checkpoint that never arrives intact.
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
        local = Path(local) if local is not None else _artifact_mirror(bucket, key)
        try:
            local_step = read_manifest(local, verify=True).get("step", -1)
        except DataError:
            local_step = -1
        if remote.get("step", -1) > local_step:
            _download_files(bkt, key, remote, text, local)

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
    local = mirror(bucket, key)
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
    local = mirror(bucket, key)
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
