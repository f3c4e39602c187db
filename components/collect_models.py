from kfp import dsl
from kfp.dsl import Artifact, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def collect_models(entries: list, index: Output[Artifact]):
    """Index a fan-in of models as {name: artifact URI} for the tasks inside later loops and
    conditions (KFP cannot pass a collected list into them); they fetch each model by its URI.

    `entries`: each training task's {"name", "uri"} (its output parameter), not the models
    themselves, so this task downloads no weights (a declared model input is copied into the
    pod whole).
    """
    from pathlib import Path

    from demix.logs import configure_logging
    from demix.stages import write_index_entries

    configure_logging()
    write_index_entries(entries, Path(index.path))
