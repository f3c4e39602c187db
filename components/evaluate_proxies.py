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
    import json
    from pathlib import Path

    from demix.config import resolve_config
    from demix.data.shards import CuratedData
    from demix.logs import configure_logging
    from demix.stages import Run, evaluate_proxies_stage, read_model_index

    configure_logging()
    rows = evaluate_proxies_stage(
        Run(
            resolve_config(Path(config.path).read_text()),
            CuratedData(Path(data.path)),
            Path(base.path),
            read_model_index(Path(component_index.path)),
        ),
        json.loads(Path(proposals.path).read_text())[shard::num_shards],
        Path(scores.path),
    )
    scores.metadata["proxies"] = len(rows)
