from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_final(
    config: Input[Artifact],
    label: str,
    data: Input[Dataset],
    base: Input[Model],
    selection: Input[Artifact],
    model: Output[Model],
    metrics: Output[Metrics],
    curves: Output[HTML],
    processes: int = 1,
    cluster: str = "",
    jobs_root: str = "",
):
    """Train a final model from the base: the chosen mixture or a baseline (uniform, token_prior);
    `label`, a run name of final_runs, names the mixture's label and the training seed's offset
    from the run seed (demix.mixtures.final_run).

    `processes`, `cluster` and `jobs_root` as in train_model; checkpoints in the bucket as in
    train_model;
    the manifest's final_loss, tokens and tokens_per_s as Metrics, its training curves as the
    page `curves`.
    """
    import json
    from pathlib import Path

    from demix.checkpoint import read_model_manifest
    from demix.config import resolve_config
    from demix.data.shards import CuratedData
    from demix.logs import configure_logging
    from demix.mixtures import final_mixture, final_run
    from demix.report import write_curves_page
    from demix.stages import train_stage
    from demix.train.reuse import reused_from

    configure_logging()
    dataset = CuratedData(Path(data.path))
    run_config = resolve_config(Path(config.path).read_text())
    run = final_run(label, run_config.final.seeds)
    mixture = final_mixture(run.label, json.loads(Path(selection.path).read_text()), dataset)
    folder = train_stage(
        run_config,
        dataset,
        "final",
        Path(model.path),
        run.name,
        Path(base.path),
        mixture,
        seed_offset=run.seed_offset,
        processes=processes,
        cluster=cluster,
        uri=model.uri,
        jobs_root=jobs_root,
    )
    manifest = read_model_manifest(folder)
    write_curves_page(folder, Path(curves.path), f"Training curves: final {label}")
    model.metadata["reused_from"] = reused_from(jobs_root, manifest.get("fingerprint"), model.uri)
    model.metadata.update({k: manifest.get(k) for k in ("name", "weights", "tokens", "final_loss")})
    for key in ("final_loss", "tokens", "tokens_per_s"):
        if manifest.get(key) is not None:
            metrics.log_metric(key, manifest[key])
    metrics.log_metric("reused", int(bool(model.metadata["reused_from"])))
