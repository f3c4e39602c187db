"""Google Cloud Storage transfers: retried, resumable, checksummed (used by demix.storage).

Transient failures (429, 5xx, connection resets, timeouts) are retried with exponential
backoff by the client library's retry policy, also for uploads (an artifact file written to the
same name with the same bytes is idempotent). Files above 8 MiB (the library's multipart limit)
go up as resumable uploads in chunks of `chunk_bytes()`, so a dropped connection resends one
chunk, not the file. Every transfer is
checked with crc32c; a download that still does not match after a few attempts is refused.

The client honours STORAGE_EMULATOR_HOST (a local emulator, anonymous credentials); otherwise it
uses Application Default Credentials. Nothing here logs or stores credentials.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
from pathlib import Path

import google_crc32c

from demix.errors import DataError

# Whole-object attempts when the bytes do not match their checksum (each attempt already
# retries transient HTTP errors inside the client library).
ATTEMPTS = 3
_CHUNK_UNIT = 256 * 1024  # resumable upload chunks must be multiples of 256 KiB


def backoff_s() -> float:
    """First retry delay in seconds (DEMIX_GCS_BACKOFF_S, default 1); it doubles up to 32x."""
    return float(os.environ.get("DEMIX_GCS_BACKOFF_S", "1.0"))


def deadline_s() -> float:
    """Give up retrying one request after this many seconds (DEMIX_GCS_DEADLINE_S, default 600)."""
    return float(os.environ.get("DEMIX_GCS_DEADLINE_S", "600"))


def chunk_bytes() -> int:
    """Resumable upload chunk size (DEMIX_GCS_CHUNK_BYTES, default 32 MiB, rounded to 256 KiB)."""
    raw = int(os.environ.get("DEMIX_GCS_CHUNK_BYTES", str(32 << 20)))
    return max(_CHUNK_UNIT, raw // _CHUNK_UNIT * _CHUNK_UNIT)


def retry_policy():
    """The storage library's retry predicate (429, 5xx, resets) with our backoff and deadline."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    first = backoff_s()
    return DEFAULT_RETRY.with_delay(initial=first, maximum=32 * first, multiplier=2.0).with_timeout(
        deadline_s()
    )


@functools.cache
def _client(emulator: str | None):
    from google.cloud import storage

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="demix-emulator", credentials=AnonymousCredentials())
    try:
        return storage.Client()
    except Exception as err:  # noqa: BLE001 (DefaultCredentialsError and project lookup errors)
        raise DataError(
            f"cannot open Google Cloud Storage ({type(err).__name__}); run "
            "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
        ) from None


def client():
    """A storage client for the current environment (cached per emulator host)."""
    return _client(os.environ.get("STORAGE_EMULATOR_HOST"))


def bucket(name: str):
    """The bucket `name`; DataError naming it when it does not exist or cannot be read."""
    from google.api_core import exceptions

    try:
        found = client().lookup_bucket(name, retry=retry_policy())
    except exceptions.Forbidden:
        raise DataError(
            f"gs://{name}: access denied to the bucket; check the credentials' permissions"
        ) from None
    except Exception as err:  # noqa: BLE001 (retries exhausted: one line, not a traceback)
        raise DataError(f"gs://{name}: cannot reach the bucket ({_reason(err)})") from None
    if found is None:
        raise DataError(f"gs://{name}: bucket does not exist; create it or fix the URI")
    return found


def _reason(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}"[:200]


def crc32c_b64(path: Path) -> str:
    """Base64 big-endian crc32c of a file, as GCS reports it in `blob.crc32c`."""
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode()


def same_object(blob, path: Path) -> bool:
    """Whether the remote blob already holds exactly the bytes of `path` (size and crc32c)."""
    return blob is not None and blob.size == path.stat().st_size and blob.crc32c == crc32c_b64(path)


def upload_file(bkt, name: str, path: Path) -> None:
    """Upload `path` to object `name`: resumable in chunks when large, retried, crc32c-checked.

    Raises DataError naming the object when the upload keeps failing or keeps arriving corrupt.
    """
    from google.cloud.storage.exceptions import DataCorruption

    last: BaseException | None = None
    for _ in range(ATTEMPTS):
        blob = bkt.blob(name, chunk_size=chunk_bytes())
        try:
            blob.upload_from_filename(str(path), checksum="crc32c", retry=retry_policy())
            return
        except DataCorruption as err:
            last = err
        except Exception as err:  # noqa: BLE001 (retries exhausted: one line, not a traceback)
            raise DataError(
                f"gs://{bkt.name}/{name}: upload failed after retries ({_reason(err)})"
            ) from None
    raise DataError(
        f"gs://{bkt.name}/{name}: upload arrived corrupt {ATTEMPTS} times ({_reason(last)})"
    )


def download_file(blob, dest: Path, check=None) -> None:
    """Download `blob` to `dest` (written under a temporary name, renamed when verified).

    `check(path)` returns None when the downloaded bytes are right, else the reason they are
    not; the download is repeated up to ATTEMPTS times. crc32c is checked by the library.
    Raises DataError naming the object when it never arrives intact.
    """
    from google.api_core import exceptions
    from google.cloud.storage.exceptions import DataCorruption

    uri = f"gs://{blob.bucket.name}/{blob.name}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.download")
    reason = "no attempt"
    try:
        for _ in range(ATTEMPTS):
            try:
                blob.download_to_filename(str(tmp), checksum="crc32c", retry=retry_policy())
            except DataCorruption:
                reason = "crc32c mismatch"
                continue
            except exceptions.NotFound:
                raise DataError(f"{uri}: object does not exist") from None
            except Exception as err:  # noqa: BLE001 (retries exhausted: one line)
                raise DataError(f"{uri}: download failed after retries ({_reason(err)})") from None
            reason = check(tmp) if check else None
            if reason is None:
                os.replace(tmp, dest)
                return
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    raise DataError(
        f"{uri}: {reason} after {ATTEMPTS} downloads; the stored object is corrupt, write the "
        "artifact again"
    )


def read_bytes(bkt, name: str) -> bytes | None:
    """The bytes of object `name` (crc32c-checked, retried), or None when it does not exist."""
    from google.api_core import exceptions
    from google.cloud.storage.exceptions import DataCorruption

    for _ in range(ATTEMPTS):
        try:
            return bkt.blob(name).download_as_bytes(checksum="crc32c", retry=retry_policy())
        except exceptions.NotFound:
            return None
        except DataCorruption:
            continue
        except Exception as err:  # noqa: BLE001 (retries exhausted: one line)
            raise DataError(
                f"gs://{bkt.name}/{name}: download failed after retries ({_reason(err)})"
            ) from None
    raise DataError(f"gs://{bkt.name}/{name}: crc32c mismatch after {ATTEMPTS} downloads")


def list_blobs(bkt, prefix: str) -> dict[str, object]:
    """{object name: blob} of every object under `prefix` (retried)."""
    try:
        return {b.name: b for b in client().list_blobs(bkt, prefix=prefix, retry=retry_policy())}
    except Exception as err:  # noqa: BLE001 (retries exhausted: one line)
        raise DataError(f"gs://{bkt.name}/{prefix}: cannot list ({_reason(err)})") from None


def delete(bkt, name: str) -> None:
    """Delete object `name` if it exists (retried; deleting twice is harmless)."""
    from google.api_core import exceptions

    with contextlib.suppress(exceptions.NotFound):
        bkt.blob(name).delete(retry=retry_policy())
