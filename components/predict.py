from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def predict(
    config: Input[Artifact],
    data: Input[Dataset],
    round_index: int,
    num_shards: int,
    history_out: Output[Artifact],
    result: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    history: Input[Artifact] = None,
    scores: Input[list[Artifact]] = None,
) -> list[int]:
    """Fit the predictor on all scores so far; propose round `round_index`, or select (-1).

    Returns the evaluation shard ids of the proposed round (empty after selection).
    """
    import json
    from pathlib import Path

    from demix.config import resolve_config
    from demix.data.shards import CuratedData
    from demix.logs import configure_logging
    from demix.report import write_search_report
    from demix.stages import predict_stage

    configure_logging()
    config = resolve_config(Path(config.path).read_text())
    found = predict_stage(
        config,
        CuratedData(Path(data.path)),
        Path(history.path) if history else None,
        [Path(s.path) for s in scores or []],
        None if round_index < 0 else round_index,
        Path(history_out.path),
        Path(result.path),
    )
    for key, value in found.items():
        if value is not None:
            metrics.log_metric(key, value)
    write_search_report(Path(history_out.path), config.search, config.evaluate, Path(report.path))
    if round_index < 0:
        return []
    return list(range(min(num_shards, len(json.loads(Path(result.path).read_text())))))
