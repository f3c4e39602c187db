"""The pipeline on this machine with kfp.local (each task a subprocess of this interpreter)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from deploy.fingerprint import data_fingerprint
from deploy.placement import Placement


def run_local(
    build_pipeline: Callable[[Placement], Callable],
    config_path: Path,
    out: Path,
    pipeline_root: Path | None = None,
    num_eval_workers: int = 2,
) -> dict:
    """Run the pipeline `build_pipeline(placement)` with kfp.local (SubprocessRunner, this
    interpreter), its search rounds unrolled from the config's search.rounds.

    Copies summary.json and report.html of the run into `out`; returns the summary.
    """
    import warnings

    from kfp import local

    from demix.config import config_yaml, load_config

    # Resource, accelerator and image settings are meaningless to the local runner.
    warnings.filterwarnings(
        "ignore", message=".*(no effect in the current local runner|non-Python base image).*"
    )
    from demix.report.summary import add_wall_times
    from demix.stages import fetch_configured_demo

    started = time.perf_counter()
    config = load_config(config_path)
    fetch_configured_demo(config)
    fetch_seconds = time.perf_counter() - started
    root = Path(pipeline_root or out / "pipeline-root").resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    pipeline = build_pipeline(Placement.for_target("local", rounds=config.search.rounds))
    pipeline(
        config_yaml=_absolute_paths(config_yaml(config)),
        data_fingerprint=data_fingerprint(config_path),
        num_eval_workers=num_eval_workers,
    )
    runs = sorted(
        root.glob(f"{pipeline.name}-*/evaluate-final/summary"), key=lambda p: p.stat().st_mtime
    )
    if not runs:
        raise SystemExit(
            f"pipeline.py: error: no evaluate-final output under {root}; see the log above"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(runs[-1] / "report.html", out / "report.html")
    summary = json.loads((runs[-1] / "summary.json").read_text())
    # The wall time adds the local runner's own overhead to the stages' work (timings_s).
    wall = {"fetch": fetch_seconds, "total": time.perf_counter() - started}
    return add_wall_times(out, summary, wall)


def _absolute_paths(text: str) -> str:
    """Local components run in another working directory: make data paths absolute."""
    import yaml

    from demix.config import load_yaml

    raw = load_yaml(text, "config")
    for spec in [*raw["data"]["datasets"], *(raw["data"].get("targets") or [])]:
        spec["paths"] = [p if "://" in p else str(Path(p).resolve()) for p in spec["paths"]]
    for section, key in (
        ("data", "fetch_demo"),
        ("evaluate", "data_dir"),
        ("evaluate", "include_path"),
        ("model", "base"),
    ):
        value = raw[section].get(key)
        if value and "://" not in value:
            raw[section][key] = str(Path(value).resolve())
    return yaml.safe_dump(raw, sort_keys=False)
