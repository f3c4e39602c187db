"""The DeMix KFP v2 pipeline: compile it for Kubeflow or Vertex AI, run it locally, submit,
upload or schedule it.

    python pipeline.py compile --target kubeflow --out demix-kubeflow.yaml
    python pipeline.py compile --target vertex --out demix-vertex.yaml
    python pipeline.py compile --target kubeflow --out demix-kubeflow.yaml --accelerator-count 8 \
        --train-timeout 3d --eval-timeout 6h --parallelism 4 --spot --ephemeral-volume 500Gi
    python pipeline.py compile --target kubeflow --out demix-kubeflow.yaml \
        --image REGISTRY/demix:0.1.0-cpu --image-cuda REGISTRY/demix@sha256:DIGEST
    python pipeline.py compile --target vertex --out demix-vertex.yaml --nodes 4 \
        --machine-type a3-highgpu-8g --accelerator-type NVIDIA_H100_80GB --accelerator-count 8 \
        [--timeout 3d] [--spot] [--service-account SA] [--encryption-key KEY] [--labels k=v]
    python pipeline.py run-local configs/demo.yaml --out runs/demo [--set search.rounds=2]
    python pipeline.py submit --host URL --package demix-kubeflow.yaml --config configs/demo.yaml \
        --pipeline-root gs://B/root [--param seed=3] [--run-name R] [--experiment E] [--no-cache]
    python pipeline.py submit --vertex --project P --region R --pipeline-root gs://B/root ...
    python pipeline.py upload --host URL --package demix-kubeflow.yaml [--version V]
    python pipeline.py upload --vertex --registry URL --package demix-vertex.yaml [--tag T]
    python pipeline.py schedule --cron '0 3 * * 1' [--max-concurrency 1] [--start-time T] ...

Targets KFP SDK 2.17.3 (pinned in pyproject.toml) with Kubeflow Pipelines backend 2.5 or newer
(IR schema 2.1.0), and Vertex AI Pipelines. Compile names pushed images (--image/--image-cuda,
or DEMIX_IMAGE_REPO=REGISTRY/PATH): it refuses the local builds' `localhost/` defaults unless
--allow-local-images; on Kubeflow `--gpu-node-selector KEY=VALUE` / `--gpu-toleration
KEY[=VALUE]:EFFECT` place the GPU tasks (default: GKE's H100 node pools). This file holds the
pipeline (the DAG of components); its command line is deploy/cli.py.
"""

import sys
from pathlib import Path
from typing import NamedTuple, TextIO

from kfp import dsl
from kfp.dsl import HTML, Artifact, Markdown, Metrics

from components.export_mixture import export_mixture
from components.final_runs import final_runs
from components.read_inputs import read_inputs
from components.resolve_config import resolve_config
from components.validate_fidelity import validate_fidelity
from deploy import cli, local
from deploy.graphs import build_graphs
from deploy.placement import Placement, on_cpu, on_gpu
from deploy.submit import PIPELINE_NAME, submit


# What a run returns at the top of its page in the UI: the chosen mixture as `demix export
# --format json` writes it, the verdict, the report, and the verdict's numbers as metrics.
class PipelineOutputs(NamedTuple):
    mixture: Artifact
    verdict: Markdown
    report: HTML
    metrics: Metrics


__all__ = [
    "Placement",
    "build_pipeline",
    "compile_pipeline",
    "main",
    "run_local",
    "submit",
]


def build_pipeline(placement: Placement):
    """The pipeline function for one placement: read and resolve the config, then the
    sub-graphs of deploy.graphs (curate, models, search, finals), the exported mixture and the
    optional fidelity check; search rounds are unrolled at compile time."""
    graphs = build_graphs(placement)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DeMix: data-mixture search by model merging",
        pipeline_root=placement.pipeline_root or None,
    )
    def demix_pipeline(
        config_yaml: str = "",
        config_uri: str = "",
        seed: int = -1,
        general_ratio: float = -1.0,
        base_model: str = "",
        datasets_json: str = "",
        search_n: int = 0,
        component_tokens: int = 0,
        final_tokens: int = 0,
        num_eval_workers: int = 2,
        validate: bool = False,
    ) -> PipelineOutputs:
        """DeMix: data-mixture search by model merging.

        A negative seed or general_ratio, a zero count and an empty string keep the config's
        value (demix.config.parameters): sentinels, not None, which kfp.local, the KFP UI and
        older Kubeflow backends do not all accept (docs/pipeline.md).

        Args:
            config_yaml: The run config as YAML text (pipeline.py submit sends a local
                --config's); leave empty when config_uri is given.
            config_uri: The run config's gs:// URI (gs://BUCKET/PATH/config.yaml), read by the
                run's first task; the way to give a config from the KFP UI or a schedule.
            seed: The run seed; -1 keeps the config's seed.
            general_ratio: train.general_ratio, the share of general data in each component's
                training mixture, in [0, 1); below 0 keeps the config's.
            base_model: model.base, your own base checkpoint to start from instead of
                training one: a Hugging Face model folder (save_pretrained) as a gs:// URI
                or /gcs/ path (pipeline pods have no hub access); empty keeps the config's.
            datasets_json: data.datasets as a JSON list of {"name", "paths"} objects; empty
                keeps the config's candidates.
            search_n: search.n, proxies in the first search round (N, then N/2, N/4, ...);
                0 keeps the config's.
            component_tokens: train.component.tokens, training tokens of each component; 0
                keeps the config's.
            final_tokens: train.final.tokens, training tokens of each final model; 0 keeps the
                config's.
            num_eval_workers: Evaluation tasks (shards) per search round.
            validate: Also check proxy fidelity: train reference models on sampled mixtures
                and compare them with their merged proxies (demix validate); costs GPU hours.
        """
        # The first task, never cached: the config's text and the fingerprints of the data and
        # the base, from listings, so every later cache key sees changed inputs.
        inputs = on_cpu(
            read_inputs(
                config_yaml=config_yaml,
                config_uri=config_uri,
                pipeline_root=dsl.PIPELINE_ROOT_PLACEHOLDER,
            ),
            placement,
        ).set_caching_options(False)
        inputs.set_display_name("read inputs")
        config = on_cpu(
            resolve_config(
                config_yaml=inputs.outputs["config_text"],
                seed=seed,
                general_ratio=general_ratio,
                base_model=base_model,
                datasets_json=datasets_json,
                search_n=search_n,
                component_tokens=component_tokens,
                final_tokens=final_tokens,
                compiled_rounds=placement.rounds,
            ),
            placement,
        ).set_caching_options(True)
        config.set_display_name("resolve config")
        cfg = config.outputs["resolved"]  # an artifact: see components/resolve_config.py

        data = graphs.curate(config=cfg, data_fingerprint=inputs.outputs["data_fingerprint"])
        dataset = data.set_display_name("curate data").output
        models = graphs.models(
            config=cfg, data=dataset, base_fingerprint=inputs.outputs["base_fingerprint"]
        ).set_display_name("train models")
        base, index = models.outputs["base"], models.outputs["index"]
        search = graphs.search(
            config=cfg,
            data=dataset,
            base=base,
            component_index=index,
            num_eval_workers=num_eval_workers,
        ).set_display_name("search mixtures")
        selection = search.output
        # The chosen mixture for training frameworks (`demix export --format json`).
        export = on_cpu(
            export_mixture(config=cfg, data=dataset, selection=selection), placement
        ).set_display_name("export mixture")

        # Optional fidelity check (off by default): trained references vs merged proxies.
        with dsl.If(validate == True, name="if validate"):  # noqa: E712 (a KFP condition)
            # one process on one GPU, but it trains reference models: the training timeout
            on_gpu(
                validate_fidelity(config=cfg, data=dataset, base=base, component_index=index),
                placement,
                gpus=placement.eval_accelerator_count,
                timeout=placement.train_timeout,
            ).set_display_name("validate proxy fidelity")

        runs = on_cpu(final_runs(config=cfg), placement)  # each label for each final seed
        runs.set_display_name("list final runs")
        judged = graphs.finals(
            config=cfg,
            data=dataset,
            base=base,
            component_index=index,
            selection=selection,
            runs=runs.output,
        ).set_display_name("final models")
        return PipelineOutputs(
            mixture=export.outputs["export"],
            verdict=judged.outputs["verdict"],
            report=judged.outputs["report"],
            metrics=judged.outputs["metrics"],
        )

    return demix_pipeline


def run_local(
    config_path: Path,
    out: Path,
    pipeline_root: Path | None = None,
    num_eval_workers: int = 2,
    progress: TextIO | None = None,
    overrides: dict[str, object] | None = None,
) -> dict:
    """Run this pipeline with kfp.local (deploy.local.run_local): the summary, report and the
    pipeline's outputs copied into `out`, the kfp.local log into `out`/kfp-local.log, one line
    per task on `progress` (default stdout); `overrides`: `--set` keys of the config."""
    return local.run_local(
        build_pipeline, config_path, out, pipeline_root, num_eval_workers, progress, overrides
    )


def compile_pipeline(
    target: str, out: str | Path, allow_local_images: bool = False, **placement
) -> Path:
    """Compile for `kubeflow` or `vertex` (deploy.cli.compile_pipeline); nothing is written when
    a check fails. Raises ConfigError for a setting the target cannot apply, a value it cannot
    take, or an image it cannot pull (under `localhost/` unless `allow_local_images`)."""
    return cli.compile_pipeline(
        build_pipeline, target, out, allow_local_images=allow_local_images, **placement
    )


def main(argv: list[str] | None = None) -> int:
    """compile | run-local | submit | upload | schedule (deploy.cli); the exit code."""
    return cli.main(argv, build_pipeline, " ".join(__doc__.split("\n\n")[0].split()))


if __name__ == "__main__":
    sys.exit(main())
