"""The pipeline's data fingerprint: part of every curation task's cache key, so changed input
data is never a cache hit."""

from __future__ import annotations

import hashlib
from pathlib import Path


def data_fingerprint(config_path: Path) -> str:
    """sha256 over the candidate datasets' local files, so changed data is never a cache hit."""
    from demix.config import load_config
    from demix.data.curate import dataset_files
    from demix.storage import sha256_file

    config = load_config(config_path)
    h = hashlib.sha256()
    for spec in config.data.datasets:
        try:
            files = dataset_files(spec)
        except Exception:  # noqa: BLE001 (remote or not yet fetched: hashed by name only)
            files = []
        for path in files:
            h.update(f"{spec.name}:{path.name}:{sha256_file(path)}".encode())
    return h.hexdigest()[:16]
