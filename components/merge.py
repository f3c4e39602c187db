from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge(
    config: Input[Artifact],
    data: Input[Dataset],
    base: Input[Model],
    components: Input[list[Model]],
    selection: Input[Artifact],
    metrics: Output[Metrics],
    merged: Output[Model],
):
    """Check the components, log ||theta_i - base|| / ||base||, and write the chosen mixture's merge."""
    import json
    from pathlib import Path

    from demix.config import resolve_config
    from demix.data.shards import CuratedData
    from demix.logs import configure_logging
    from demix.stages import merge_stage, models_by_name

    configure_logging()
    report = merge_stage(
        resolve_config(Path(config.path).read_text()),
        CuratedData(Path(data.path)),
        Path(base.path),
        models_by_name([Path(c.path) for c in components]),
        json.loads(Path(selection.path).read_text())["mixture"],
        Path(merged.path),
    )
    for name, value in report["relative_delta_norms"].items():
        metrics.log_metric(f"relative_delta_norm/{name}", value)
    metrics.log_metric("large_updates", len(report["large_updates"]))
