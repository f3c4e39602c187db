from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def evaluate_proxies(
    config: Input[Artifact],
    data: Input[Dataset],
    base: Input[Model],
    component_index: Input[Artifact],
    proposals: Input[Artifact],
    shard: int,
    num_shards: int,
    scores: Output[Artifact],
):
    """Build each proposed proxy in memory (one shard of the round) and score it; JSONL rows out."""
    from pathlib import Path

    from demix.config import resolve_config
    from demix.stages import evaluate_proxies_step

    rows = evaluate_proxies_step(
        resolve_config(Path(config.path).read_text()),
        Path(data.path),
        Path(base.path),
        Path(component_index.path),
        Path(proposals.path),
        shard,
        num_shards,
        Path(scores.path),
    )
    scores.metadata["proxies"] = len(rows)
