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
    from pathlib import Path

    from demix.config import resolve_config
    from demix.stages import merge_step

    report = merge_step(
        resolve_config(Path(config.path).read_text()),
        Path(data.path),
        Path(base.path),
        [Path(c.path) for c in components],
        Path(selection.path),
        Path(merged.path),
    )
    for name, value in report["relative_delta_norms"].items():
        metrics.log_metric(f"relative_delta_norm/{name}", value)
    metrics.log_metric("large_updates", len(report["large_updates"]))
