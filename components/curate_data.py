from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def curate_data(config: Input[Artifact], data_fingerprint: str, dataset: Output[Dataset]):
    """Clean, dedupe, split, tokenize and pack the candidate datasets.

    data_fingerprint (content hashes of the inputs) is part of the cache key only.
    """
    from pathlib import Path

    from demix.config import resolve_config
    from demix.stages import curate_stage

    data = curate_stage(resolve_config(Path(config.path).read_text()), Path(dataset.path))
    dataset.metadata["token_prior"] = data.token_prior
    dataset.metadata["data_fingerprint"] = data_fingerprint
