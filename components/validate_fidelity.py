from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def validate_fidelity(
    config: Input[Artifact],
    data: Input[Dataset],
    base: Input[Model],
    component_index: Input[Artifact],
    metrics: Output[Metrics],
    fidelity: Output[Artifact],
    report: Output[HTML],
):
    """Train reference models on sampled mixtures and compare them with their merged proxies."""
    from pathlib import Path

    from demix.config import resolve_config
    from demix.logs import configure_logging
    from demix.stages.validate import validate_step

    configure_logging()
    result = validate_step(
        resolve_config(Path(config.path).read_text()),
        Path(data.path),
        Path(base.path),
        Path(component_index.path),
        Path(fidelity.path),
        Path(report.path),
    )
    for category, entry in result["categories"].items():
        metrics.log_metric(f"rho_proxy/{category}", entry["proxy"]["rho"])
        metrics.log_metric(f"rho_weights_fit/{category}", entry["trivial_linear"]["rho"])
        metrics.log_metric(f"rho_quadratic_fit/{category}", entry["trivial_quadratic"]["rho"])
        metrics.log_metric(f"regret_proxy/{category}", entry["proxy"]["regret"])
    metrics.log_metric("macro_rho_proxy", result["macro"]["proxy"]["rho"])
    metrics.log_metric("crr/mean", result["crr"]["mean"])
