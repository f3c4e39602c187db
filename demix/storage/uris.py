"""Where artifacts live: local paths (KFP's /gcs/ FUSE paths included) and gs://bucket/path.

A gs:// artifact is read and written through a local mirror under the cache folder
(`DEMIX_CACHE`, default ~/.cache/demix); demix.storage.remote moves files between the two.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from demix.errors import DataError

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


def mirror(bucket: str, key: str) -> Path:
    """The local mirror of gs://bucket/key in the cache folder."""
    return cache_dir() / "gcs" / bucket / key
