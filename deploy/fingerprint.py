"""The pipeline's data fingerprint: part of every curation task's cache key, so changed input
data is never a cache hit."""

from __future__ import annotations

import hashlib
from pathlib import Path


def data_fingerprint(config_path: Path) -> str:
    """A hash of the candidate and target datasets' inputs, so changed data is never a cache hit.

    Local files are hashed by content (sha256); gs:// objects by the metadata of a listing
    (generation, crc32c, size: nothing is downloaded). A local path that does not exist here
    (a folder the demo fetch fills later) counts by its name only.
    Raises DataError when a gs:// path cannot be listed or lists nothing.
    """
    from demix.config import load_config
    from demix.data.sources import dataset_files
    from demix.errors import DataError
    from demix.storage import check_uri, is_remote, sha256_file

    config = load_config(config_path)
    h = hashlib.sha256()
    for spec in config.data.all_specs:
        for entry in spec.paths:
            check_uri(entry)
            if is_remote(entry):
                for name, generation, crc32c, size in remote_listing(entry):
                    h.update(f"{spec.name}:{name}:{generation}:{crc32c}:{size}\n".encode())
                continue
            try:
                files = dataset_files(spec.model_copy(update={"paths": [entry]}))
            except DataError:
                h.update(f"{spec.name}:{entry}:absent\n".encode())
                continue
            for path in files:
                h.update(f"{spec.name}:{path.name}:{sha256_file(path)}\n".encode())
    return h.hexdigest()[:16]


def remote_listing(uri: str) -> list[tuple[str, int, str, int]]:
    """(gs:// URI, generation, crc32c, size) of the object `uri` or of every object under the
    folder `uri`, from one listing, sorted by name.

    Raises DataError for a missing bucket, a listing that fails, or nothing at the URI.
    """
    from demix import gcs
    from demix.errors import DataError
    from demix.storage import split_gs

    bucket, key = split_gs(uri)
    blobs = gcs.list_blobs(gcs.bucket(bucket), key)
    found = sorted(
        (f"gs://{bucket}/{name}", int(blob.generation or 0), str(blob.crc32c), int(blob.size))
        for name, blob in blobs.items()
        if (name == key or name.startswith(f"{key}/")) and not name.endswith("/")
    )
    if not found:
        raise DataError(
            f"{uri}: no such object or folder in gs://{bucket}; fix data.datasets or data.targets"
        )
    return found
