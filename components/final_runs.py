from kfp import dsl
from kfp.dsl import Artifact, Input

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def final_runs(config: Input[Artifact]) -> list[str]:
    """The final models to train, by run name: each of chosen, uniform and token_prior for each
    of the config's final.seeds training seeds, to fan final training out over (train_final
    looks each name up among the same runs: demix.mixtures.final_run)."""
    from pathlib import Path

    from demix.config import resolve_config
    from demix.logs import configure_logging
    from demix.mixtures import final_runs

    configure_logging()
    seeds = resolve_config(Path(config.path).read_text()).final.seeds
    return [run.name for run in final_runs(seeds)]
