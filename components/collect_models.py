from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def collect_models(models: Input[list[Model]], index: Output[Artifact]):
    """Index a fan-in of models as {name: artifact URI} for the tasks inside later loops and
    conditions (KFP cannot pass a collected list into them); they fetch each model by its URI."""
    from pathlib import Path

    from demix.logs import configure_logging
    from demix.stages import write_model_index

    configure_logging()

    write_model_index([(m.path, m.uri) for m in models], Path(index.path))
