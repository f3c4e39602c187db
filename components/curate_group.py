from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def curate_group(plan: Input[Artifact], group: int, part: Output[Artifact]):
    """Clean, dedupe within the group and tokenize one group of the plan's input files."""
    from pathlib import Path

    from demix.logs import configure_logging
    from demix.stages import curate_group_stage

    configure_logging()
    manifest = curate_group_stage(Path(plan.path), int(group), Path(part.path))
    part.metadata["documents"] = sum(d["documents"] for d in manifest["datasets"].values())
