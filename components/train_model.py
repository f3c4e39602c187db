from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_model(
    config: Input[Artifact],
    role: str,
    name: str,
    data: Input[Dataset],
    model: Output[Model],
    init: Input[Model] = None,
    processes: int = 1,
    cluster: str = "",
):
    """Train the base (role "base") or the component of dataset `name` (role "component").

    `processes` > 1: under accelerate launch, one process per GPU; `cluster`: on the machines
    of a Vertex AI custom job (see demix.stages.launch_train).
    """
    from pathlib import Path

    from demix.config import resolve_config
    from demix.stages import train_step

    manifest = train_step(
        resolve_config(Path(config.path).read_text()),
        Path(data.path),
        role,
        name,
        Path(init.path) if init else None,
        Path(model.path),
        processes=processes,
        cluster=cluster,
    )
    model.metadata.update(
        {k: manifest.get(k) for k in ("role", "name", "tokens", "final_loss", "seconds")}
    )
