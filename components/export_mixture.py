from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def export_mixture(
    config: Input[Artifact],
    data: Input[Dataset],
    selection: Input[Artifact],
    export: Output[Artifact],
):
    """The chosen mixture as `demix export --format json` writes it: mixture, component weights,
    token prior, train tokens per dataset and the epochs each would see in the final budget.
    The artifact's metadata holds the mixture and its text in every other export format, so
    the run page shows what to paste into a training framework."""
    import json
    from pathlib import Path

    from demix.config import resolve_config
    from demix.data.shards import CuratedData
    from demix.export import FORMATS, render, selection_export
    from demix.logs import configure_logging
    from demix.storage import atomic_write_text

    configure_logging()
    result = selection_export(
        CuratedData(Path(data.path)),
        json.loads(Path(selection.path).read_text()),
        resolve_config(Path(config.path).read_text()).train.final.tokens,
    )
    atomic_write_text(export.path, render(result, "json"))
    export.metadata["format"] = "json"
    export.metadata["mixture"] = result["mixture"]
    for fmt in (f for f in FORMATS if f != "json"):
        export.metadata[fmt] = render(result, fmt)
