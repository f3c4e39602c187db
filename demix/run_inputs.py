"""What a run reads, fixed at its start: the config text (inline or by URI) and fingerprints of
the data and the base model, so a pipeline's cache keys see changed inputs.

The pipeline's first task calls `read_run_inputs` (never cached), wherever the run was started:
`pipeline.py submit`, the KFP UI, the Vertex AI console or a schedule all get the same key for
the same inputs. Fingerprints come from listings (gs://: object generation, crc32c and size;
nothing is downloaded) or, for local files, from their content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from demix.config import DataConfig, ModelConfig, resolve_config
from demix.errors import ConfigError, DataError
from demix.storage import check_uri, is_remote, sha256_file


@dataclass(frozen=True)
class RunInputs:
    """The config's text and the fingerprints of what the run reads."""

    config_text: str
    data_fingerprint: str
    base_fingerprint: str


def read_config_text(config_yaml: str, config_uri: str) -> str:
    """The run config's YAML text: `config_yaml` itself, or the object at `config_uri`
    (gs://, /gcs/ or a local path). Exactly one of the two must be given.

    Raises ConfigError when both or neither are given, DataError when the URI cannot be read.
    """
    if bool(config_yaml.strip()) == bool(config_uri.strip()):
        raise ConfigError(
            "give the run config as exactly one of config_yaml (YAML text) and config_uri "
            "(gs://BUCKET/PATH/config.yaml)"
        )
    if config_yaml.strip():
        return config_yaml
    from demix.storage import fetch_files

    uri = config_uri.strip()
    path = fetch_files(uri)
    if not path.is_file():
        raise DataError(f"config_uri {uri}: not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"config_uri {uri}: cannot read it as UTF-8 text ({err})") from None


def check_pipeline_root(root: str) -> str:
    """`root` when DeMix's tasks can read artifacts under it: gs:// (Kubeflow, Vertex AI) or a
    local folder (kfp.local). Tasks open each other's artifacts by URI through demix.storage.

    Raises ConfigError for any other scheme (Kubeflow's default root is minio://).
    """
    if root.startswith("gs://") and root[len("gs://") :].strip("/"):
        return root
    if "://" not in root and root.startswith("/"):
        return root
    raise ConfigError(
        f"pipeline root {root!r}: DeMix's tasks read artifacts through gs:// only; compile with "
        "`pipeline.py compile --pipeline-root gs://BUCKET/PATH` or give the run a gs:// root"
    )


def read_run_inputs(config_yaml: str, config_uri: str = "") -> RunInputs:
    """The config text (validated) and the fingerprints of its data and base.

    Raises ConfigError for an invalid config, DataError for data or a base that cannot be listed.
    """
    text = read_config_text(config_yaml, config_uri)
    config = resolve_config(text, source=config_uri or "config_yaml")
    return RunInputs(text, data_fingerprint(config.data), base_fingerprint(config.model))


def data_fingerprint(data_cfg: DataConfig) -> str:
    """A hash of the candidate and target datasets' inputs, so changed data is never a cache hit.

    Local files are hashed by content (sha256); gs:// objects by the metadata of a listing
    (generation, crc32c, size: nothing is downloaded). A local path that does not exist here
    (a folder the demo fetch fills later) counts by its name only.
    Raises DataError when a gs:// path cannot be listed or lists nothing.
    """
    from demix.data.sources import dataset_files

    h = hashlib.sha256()
    for spec in data_cfg.all_specs:
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


def base_fingerprint(model: ModelConfig) -> str:
    """The content fingerprint of `model.base` ("" when the run trains its own base):
    demix.base_model.base_fingerprint (gs:// from one listing, nothing downloaded).

    Raises ConfigError, DataError or ModelError when the base cannot be listed or read.
    """
    if not model.base:
        return ""
    from demix.base_model import base_fingerprint as content_fingerprint

    return content_fingerprint(model.base)


def remote_listing(uri: str) -> list[tuple[str, int, str, int]]:
    """(gs:// URI, generation, crc32c, size) of the object `uri` or of every object under the
    folder `uri`, from one listing, sorted by name.

    Raises DataError for a missing bucket, a listing that fails, or nothing at the URI.
    """
    from demix import gcs
    from demix.storage import split_gs

    bucket, key = split_gs(uri)
    blobs = gcs.list_blobs(gcs.bucket(bucket), key)
    found = sorted(
        (f"gs://{bucket}/{name}", int(blob.generation or 0), str(blob.crc32c), int(blob.size))
        for name, blob in blobs.items()
        if (name == key or name.startswith(f"{key}/")) and not name.endswith("/")
    )
    if not found:
        raise DataError(f"{uri}: no such object or folder in gs://{bucket}")
    return found
