from kfp import dsl
from kfp.dsl import Artifact, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def resolve_config(
    config_yaml: str,
    seed: int,
    general_ratio: float,
    base_model: str,
    datasets_json: str,
    search_n: int,
    component_tokens: int,
    final_tokens: int,
    resolved: Output[Artifact],
    compiled_rounds: int = 0,
):
    """Apply the pipeline parameters to the run config (demix.config.parameters: a negative
    seed or general_ratio, a zero count and an empty string keep the config's value) and
    validate it once, up front; its search.rounds must be the `compiled_rounds` unrolled into
    this pipeline (0: not checked, for calls outside a compiled pipeline).

    The result is an artifact, not a string output: kfp.local 2.17 hands a loop's item to
    string task outputs consumed inside a ParallelFor.
    """
    from pathlib import Path

    from demix.config import config_yaml as to_yaml
    from demix.config import resolve_config as resolve
    from demix.config.parameters import pipeline_overrides
    from demix.logs import configure_logging

    configure_logging()
    overrides = pipeline_overrides(
        {
            "seed": seed,
            "general_ratio": general_ratio,
            "base_model": base_model,
            "datasets_json": datasets_json,
            "search_n": search_n,
            "component_tokens": component_tokens,
            "final_tokens": final_tokens,
        }
    )
    config = resolve(config_yaml, overrides, compiled_rounds=compiled_rounds or None)
    Path(resolved.path).write_text(to_yaml(config))
