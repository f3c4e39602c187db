from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan_curation(
    config: Input[Artifact], data_fingerprint: str, plan: Output[Artifact]
) -> list[int]:
    """List the input files, split them into groups and fix the tokenizer; return the groups.

    data_fingerprint (content hashes of the inputs) is part of the cache key only.
    """
    from pathlib import Path

    from demix.config import resolve_config
    from demix.logs import configure_logging
    from demix.stages import plan_curation_stage

    configure_logging()
    groups = plan_curation_stage(resolve_config(Path(config.path).read_text()), Path(plan.path))
    plan.metadata["groups"] = len(groups)
    return groups
