"""Artifact storage: atomic writes, manifests written last, local paths and gs:// URIs alike.

One concern per module: `files` (sha256, atomic writes, staged artifact folders), `manifest`
(write, read and verify manifests), `uris` (local paths, gs:// URIs, the local mirror) and
`remote` (gs:// fetch and publish, synced folders, checkpoints). KFP's `/gcs/bucket/...` paths
are a FUSE mount of the same bucket and are plain local paths here.
"""

from demix.storage.files import (
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    kept_json,
    recover_replaced_dir,
    sha256_file,
    staged_dir,
)
from demix.storage.manifest import (
    check_manifest_entry,
    file_mismatch,
    list_files,
    parse_manifest,
    read_manifest,
    verify_artifact,
    write_manifest,
)
from demix.storage.outputs import write_output_bytes
from demix.storage.remote import (
    artifact_output,
    checkpoint_sync,
    discard_checkpoint,
    fetch_artifact,
    fetch_files,
    fetch_manifest,
    remote_files,
    synced_folder,
    upload_artifact,
)
from demix.storage.uris import cache_dir, check_uri, is_remote, split_gs

__all__ = [
    "MANIFEST",
    "artifact_output",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "check_manifest_entry",
    "check_uri",
    "checkpoint_sync",
    "discard_checkpoint",
    "fetch_artifact",
    "fetch_files",
    "fetch_manifest",
    "file_mismatch",
    "is_remote",
    "kept_json",
    "list_files",
    "parse_manifest",
    "read_manifest",
    "recover_replaced_dir",
    "remote_files",
    "sha256_file",
    "split_gs",
    "staged_dir",
    "synced_folder",
    "upload_artifact",
    "verify_artifact",
    "write_manifest",
    "write_output_bytes",
]
