from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def curate_data(
    plan: Input[Artifact],
    parts: Input[list[Artifact]],
    data_fingerprint: str,
    dataset: Output[Dataset],
):
    """Merge the curated groups: cross-group dedupe, held-out split, packed token streams.

    The artifact's metadata shows, in the KFP UI, each dataset's token share, the input paths
    it was curated from (`sources`) and the data fingerprint of the run's inputs.
    """
    from pathlib import Path

    from demix.data.curate_plan import plan_sources
    from demix.logs import configure_logging
    from demix.stages import merge_curation_stage

    configure_logging()
    data = merge_curation_stage(Path(plan.path), [Path(p.path) for p in parts], Path(dataset.path))
    dataset.metadata["token_prior"] = data.token_prior
    dataset.metadata["data_fingerprint"] = data_fingerprint
    dataset.metadata["sources"] = plan_sources(plan.path)
