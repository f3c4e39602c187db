from kfp import dsl
from kfp.dsl import Artifact, Input

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def dataset_names(config: Input[Artifact]) -> list[str]:
    """The candidate dataset names, to fan component training out over."""
    from pathlib import Path

    from demix.config import resolve_config
    from demix.logs import configure_logging

    configure_logging()
    return [d.name for d in resolve_config(Path(config.path).read_text()).data.datasets]
