from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def evaluate_final(
    config: Input[Artifact],
    data: Input[Dataset],
    base: Input[Model],
    component_index: Input[Artifact],
    finals: Input[list[Model]],
    selection: Input[Artifact],
    summary: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    verdict: Output[Markdown],
):
    """Evaluate the chosen and baseline final models and judge the chosen mixture against the
    baselines; summary.json, report.html, the verdict's differences and intervals as Metrics,
    the mixtures and the verdict as Markdown. The components are read through their index,
    manifests only (tokens, seconds, relative delta norm): their weights are not inputs."""
    import json
    import shutil
    from pathlib import Path

    from demix.config import resolve_config
    from demix.data.shards import CuratedData
    from demix.logs import configure_logging
    from demix.report.summary import verdict_markdown
    from demix.stages import (
        Run,
        evaluate_finals_stage,
        models_by_name,
        read_component_manifests,
    )

    configure_logging()
    out = Path(summary.path)
    run = Run(
        resolve_config(Path(config.path).read_text()), CuratedData(Path(data.path)), Path(base.path)
    )
    result = evaluate_finals_stage(
        run,
        read_component_manifests(Path(component_index.path), run.base),
        models_by_name([Path(f.path) for f in finals]),
        json.loads(Path(selection.path).read_text()),
        out,
    )
    shutil.copy(out / "report.html", report.path)
    Path(verdict.path).write_text(verdict_markdown(result))
    for baseline, entries in result["verdict"].items():
        for key, entry in entries.items():
            if key != "tasks":
                for field in ("diff", "ci_low", "ci_high"):
                    metrics.log_metric(f"vs_{baseline}/{key}/{field}", entry[field])
    for name, weight in result["mixture"].items():
        metrics.log_metric(f"mixture/{name}", weight)
