"""`demix plan` beside what runs measured: the plan's time per stage on `cpu` over the seconds
of work each stage's artifacts record, for finished run folders of this machine.

A run folder of `demix run` or `pipeline.py run-local` gives every stage (summary.json's
timings_s, with the config beside it); a `demix reproduce` folder gives the base and the
components (their manifests' seconds). Ratios near 1 mean the plan's rates hold on this machine;
the issue's target is within 2x (0.5 to 2).

Usage: python benchmarks/plan_accuracy.py RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from demix.config import RunConfig, load_config
from demix.stages.plan import accelerator, plan_run


def measured_seconds(run: Path) -> dict[str, float]:
    """Seconds of work per plan stage that the run's artifacts record."""
    summary = run / "summary.json"
    if summary.is_file():
        timings = json.loads(summary.read_text())["timings_s"]
        names = {"curate": "curate", "base": "base", "components": "components"}
        names |= {"search": "search", "finals": "final"}
        return {stage: timings[key] for stage, key in names.items() if timings.get(key)}
    seconds: dict[str, float] = {}
    for manifest in sorted((run / "models").glob("*/manifest.json")):
        found = json.loads(manifest.read_text())
        stage = {"base": "base", "component": "components"}.get(found.get("role"))
        if stage and "seconds" in found:
            seconds[stage] = seconds.get(stage, 0.0) + float(found["seconds"])
    dataset = run / "dataset" / "manifest.json"
    if dataset.is_file() and "seconds" in (found := json.loads(dataset.read_text())):
        seconds["curate"] = float(found["seconds"])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    parser.add_argument("--eval-workers", type=int, default=1, help="as the run had (default 1)")
    parser.add_argument(
        "--config", type=Path, help="the run config, for a folder without config.json beside it"
    )
    args = parser.parse_args()
    device = accelerator("cpu")
    print(f"plan on {device.name}: {device.source}")
    print("| run | stage | planned s | measured s | planned / measured |")
    print("|---|---|---:|---:|---:|")
    for run in args.runs:
        if (run / "config.json").is_file():
            config = RunConfig.model_validate(json.loads((run / "config.json").read_text()))
        else:
            config = load_config(args.config)
        planned = {row.stage: row.seconds for row in plan_run(config, device, args.eval_workers)}
        for stage, seconds in measured_seconds(run).items():
            ratio = planned[stage] / seconds if seconds else float("nan")
            print(f"| {run} | {stage} | {planned[stage]:.1f} | {seconds:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
