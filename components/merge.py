from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge(
    config: Input[Artifact],
    data: Input[Dataset],
    base: Input[Model],
    component_index: Input[Artifact],
    selection: Input[Artifact],
    metrics: Output[Metrics],
    merged: Output[Model],
):
    """Check the components, log ||theta_i - base|| / ||base||, and write the chosen mixture's merge.

    The components come by their URIs in `component_index` (collect_models), fetched through
    demix.storage, as the search's evaluation tasks fetch them.
    """
    import json
    from pathlib import Path

    from demix.config import resolve_config
    from demix.data.shards import CuratedData
    from demix.logs import configure_logging
    from demix.stages import Run, merge_stage, read_model_index

    configure_logging()
    report = merge_stage(
        Run(
            resolve_config(Path(config.path).read_text()),
            CuratedData(Path(data.path)),
            Path(base.path),
            read_model_index(Path(component_index.path)),
        ),
        json.loads(Path(selection.path).read_text())["mixture"],
        Path(merged.path),
    )
    for name, value in report["relative_delta_norms"].items():
        metrics.log_metric(f"relative_delta_norm/{name}", value)
    metrics.log_metric("large_updates", len(report["large_updates"]))
