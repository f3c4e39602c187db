from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_model(
    config: Input[Artifact],
    role: str,
    name: str,
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    curves: Output[HTML],
    init: Input[Model] = None,
    processes: int = 1,
    cluster: str = "",
    jobs_root: str = "",
    base_fingerprint: str = "",
) -> str:
    """Train the base (role "base") or the component of dataset `name` (role "component").

    With model.base set, role "base" writes that model, fetched and verified, into `model`
    (its source, revision and content fingerprint in the manifest and the metadata).

    `processes` > 1: under accelerate launch, one process per GPU; `cluster`: on the machines
    of a Vertex AI custom job (see demix.stages.launch_train). Checkpoints go to
    `<model.uri>.ckpt` in the bucket as they are written; a rerun resumes from there.
    `jobs_root` (the pipeline root): a model an earlier run trained for the same job, by
    content, is copied instead of trained (demix.train.reuse); `base_fingerprint`: the content
    of model.base, in the cache key only.
    The model manifest's final_loss, tokens and tokens_per_s are logged as Metrics; `curves`
    is the page of its training curves (loss, learning rate, tokens/s per logged step). Returns
    the model's entry of the component index ({"name", "uri"}), which collect_models gathers
    without downloading any weights.
    """
    from pathlib import Path

    from demix.checkpoint import read_model_manifest
    from demix.config import resolve_config
    from demix.data.shards import CuratedData
    from demix.logs import configure_logging
    from demix.report import write_curves_page
    from demix.stages import index_entry, train_stage
    from demix.train.reuse import reused_from

    configure_logging()
    folder = train_stage(
        resolve_config(Path(config.path).read_text()),
        CuratedData(Path(data.path)),
        role,
        Path(model.path),
        name,
        Path(init.path) if init else None,
        processes=processes,
        cluster=cluster,
        uri=model.uri,
        jobs_root=jobs_root,
    )
    manifest = read_model_manifest(folder)
    write_curves_page(folder, Path(curves.path), f"Training curves: {role} {name}")
    model.metadata["reused_from"] = reused_from(jobs_root, manifest.get("fingerprint"), model.uri)
    model.metadata.update(
        {k: manifest.get(k) for k in ("role", "name", "tokens", "final_loss", "seconds")}
    )
    lineage = ("base_source", "base_revision", "base_fingerprint")  # model.base, when given
    model.metadata.update({k: manifest[k] for k in lineage if manifest.get(k) is not None})
    for key in ("final_loss", "tokens", "tokens_per_s"):  # none for a foreign base model
        if manifest.get(key) is not None:
            metrics.log_metric(key, manifest[key])
    metrics.log_metric("reused", int(bool(model.metadata["reused_from"])))
    return index_entry(folder, model.uri)
