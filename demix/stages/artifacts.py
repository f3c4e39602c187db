"""Artifact plumbing of the pipeline: the base model's folder, the index of trained models
({name: folder or uri}) and the component manifests it points to."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from demix import checkpoint, merge
from demix.base_model import resolve_base
from demix.checkpoint import MODEL_KIND, RELATIVE_DELTA_NORM
from demix.config import RunConfig
from demix.errors import DemixError
from demix.storage import atomic_write_json, fetch_artifact, fetch_manifest

log = logging.getLogger(__name__)


def base_model_dir(config: RunConfig) -> Path | None:
    """The local folder of `model.base` (a gs:// folder or hub id fetched once, every form
    verified once: demix.base_model), or None."""
    if not config.model.base:
        return None
    return resolve_base(config.model.base, config.model.trust_remote_code).folder


def models_by_name(paths: list[str | Path]) -> dict[str, Path]:
    """Model artifact folders keyed by the `name` in their manifest (order-independent).

    Raises DemixError for a folder whose manifest names no model.
    """
    out = {}
    for path in map(Path, paths):
        # looked up on the module at call time: one reader of manifests, patchable in tests
        name = checkpoint.read_model_manifest(path).get("name")
        if not name:
            raise DemixError(
                f"{path}: model manifest has no name; was it written by `demix train`?"
            )
        out[name] = path
    return out


def write_model_index(models: list[tuple[str | Path, str]], out: Path) -> dict[str, str]:
    """{name: artifact URI} of model artifacts as JSON, from (local folder, URI) pairs.

    The URI (a pipeline artifact's `.uri`: gs:// on Kubeflow and Vertex, a local path under
    kfp.local), never the local folder, is what another task can open: on Kubeflow a task's
    local paths do not exist in any other pod. Read back with `read_model_index`.
    Raises DemixError for a folder whose manifest names no model.
    """
    uris = {str(Path(folder)): uri for folder, uri in models}
    index = {name: uris[str(path)] for name, path in models_by_name(list(uris)).items()}
    atomic_write_json(out, index)
    return index


def read_component_manifests(index: Path, base: Path) -> dict[str, dict]:
    """The manifests of the models of a `write_model_index` file, by name, each read alone
    through demix.storage (no weights fetched). A model trained before relative delta norms
    were recorded at training time is fetched once and measured against `base`.

    Raises DemixError naming the index and the model when a manifest is missing or corrupt.
    """
    manifests = {}
    for name, uri in json.loads(Path(index).read_text()).items():
        try:
            manifest = fetch_manifest(uri, MODEL_KIND)
            if manifest.get(RELATIVE_DELTA_NORM) is None:
                log.warning("component %s has no relative delta norm recorded: measured", name)
                folder = fetch_artifact(uri, MODEL_KIND)
                norm = merge.relative_delta_norms(base, [folder])[0]
                manifest = {**manifest, RELATIVE_DELTA_NORM: norm}
        except DemixError as err:
            raise DemixError(f"{index}: model {name!r}: {err}") from None
        manifests[name] = manifest
    return manifests


def index_entry(folder: Path, uri: str) -> str:
    """A trained model's entry of the model index, {"name", "uri"} as JSON (a training task's
    output parameter, so the index is built without moving any weights).

    Raises DemixError for a folder whose manifest names no model.
    """
    return json.dumps({"name": next(iter(models_by_name([folder]))), "uri": str(uri)})


def write_index_entries(entries: list[str | dict], out: Path) -> dict[str, str]:
    """The model index {name: artifact URI} from index entries (index_entry's, as JSON text or
    parsed) into `out`, as write_model_index writes it from folders.

    Raises DemixError for an entry without a name or URI, or a name given twice.
    """
    index: dict[str, str] = {}
    for entry in entries:
        item = json.loads(entry) if isinstance(entry, str) else entry
        if not isinstance(item, dict) or not item.get("name") or not item.get("uri"):
            raise DemixError(f"model index entry {entry!r} has no name or uri")
        if item["name"] in index:
            raise DemixError(f"model index: {item['name']!r} is given twice")
        index[item["name"]] = item["uri"]
    atomic_write_json(out, index)
    return index


def read_model_index(path: Path) -> dict[str, Path]:
    """The models of a `write_model_index` file as local folders, each fetched by its URI
    through demix.storage (gs:// downloaded into the cache) and verified against its manifest.

    Raises DemixError naming the index and the model when one is missing, incomplete or corrupt.
    """
    index = json.loads(Path(path).read_text())
    folders = {}
    for name, uri in index.items():
        try:
            folders[name] = fetch_artifact(uri, MODEL_KIND)
        except DemixError as err:
            raise DemixError(f"{path}: model {name!r}: {err}") from None
    return folders
