from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train_final(
    config: Input[Artifact],
    label: str,
    data: Input[Dataset],
    base: Input[Model],
    selection: Input[Artifact],
    model: Output[Model],
    processes: int = 1,
    cluster: str = "",
):
    """Train a final model from the base: the chosen mixture or a baseline (uniform, token_prior).

    `processes` and `cluster` as in train_model.
    """
    from pathlib import Path

    from demix.config import resolve_config
    from demix.stages import final_step

    manifest = final_step(
        resolve_config(Path(config.path).read_text()),
        Path(data.path),
        Path(base.path),
        Path(selection.path),
        label,
        Path(model.path),
        processes=processes,
        cluster=cluster,
    )
    model.metadata.update({k: manifest.get(k) for k in ("name", "weights", "tokens", "final_loss")})
