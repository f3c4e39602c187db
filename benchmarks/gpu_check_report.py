"""The table of benchmarks/gpu_check.sh: measured ratios beside their targets, from the JSON and
JUnit files its steps wrote into one folder; written to gpu_check.txt (and the measured numbers
to gpu_check.json, which benchmarks/scale_table.py --measured reads).

Usage: python benchmarks/gpu_check_report.py OUT_DIR [--device cuda|cpu]
Exit status 1 when a step left no result (its log is OUT_DIR/<step>.log).
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

# row -> target; rows without a target are printed for reference
TARGETS = {
    "pytest -m gpu": "all pass",
    "device copy bandwidth (HBM floor)": "",
    "host-to-device bandwidth (transfer floor)": "",
    "in-place proxy, linear / device copy floor": "<= 1.3x",
    "in-place proxy, ties / device copy floor": "",
    "in-place proxy, dare_ties / device copy floor": "",
    "host-streamed proxy, linear / transfer floor": "<= 1.3x",
    "host-streamed proxy, ties / transfer floor": "",
    "host-streamed proxy, dare_ties / transfer floor": "",
    "fast evaluation: lm-eval s / fast s": ">= 3x",
    "fast evaluation: accuracy differences": "0",
    "fast evaluation: fast s / forward-pass floor": "<= 1.3x",
    "training bf16: demix / bare torch tokens/s": ">= 0.9x",
}


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_row(path: Path) -> tuple[str, bool | None]:
    """('N passed, F failed, S skipped', all passed and something ran) from a JUnit file."""
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no result", False
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = counts["failures"] + counts["errors"]
    passed = counts["tests"] - failed - counts["skipped"]
    text = f"{passed} passed, {failed} failed, {counts['skipped']} skipped"
    return text, failed == 0 and passed > 0


def measured(out: Path) -> dict[str, tuple[str, float | None]]:
    """Row -> (text, number compared with the target; None when there is nothing to compare)."""
    rows: dict[str, tuple[str, float | None]] = {}
    merge = _load(out / "merge.json") or {}
    for mode, floor in (("device", "device copy floor"), ("host", "transfer floor")):
        timings = merge.get(mode)
        if not timings:
            continue
        label = (
            "device copy bandwidth (HBM floor)"
            if mode == "device"
            else ("host-to-device bandwidth (transfer floor)")
        )
        rows[label] = (f"{timings['bandwidth'] / 1e9:.1f} GB/s", None)
        name = "in-place proxy" if mode == "device" else "host-streamed proxy"
        for method, ratio in timings["ratios"].items():
            seconds = timings["times"][method]
            rows[f"{name}, {method} / {floor}"] = (f"{ratio:.2f}x ({seconds * 1e3:.2f} ms)", ratio)
    for row in _load(out / "eval.json") or []:
        speedup = row["lm-eval"] / row["fast"]
        rows["fast evaluation: lm-eval s / fast s"] = (
            f"{speedup:.2f}x ({row['device']}, {row['attention']})",
            speedup,
        )
        rows["fast evaluation: accuracy differences"] = (
            f"{row['accuracy_mismatches']} (max rel diff {row['largest_relative']:.1e})",
            row["accuracy_mismatches"],
        )
        overhead = row["fast"] / row["floor"]
        rows["fast evaluation: fast s / forward-pass floor"] = (f"{overhead:.2f}x", overhead)
    train = _load(out / "train.json")
    if train:
        ratio = train["demix"] / train["bare"]
        dtype = train["dtype"].removeprefix("torch.")
        rows["training bf16: demix / bare torch tokens/s"] = (
            f"{ratio:.2f}x ({train['demix']:,.0f} tok/s, {dtype})",
            ratio,
        )
    return rows


def met(target: str, value: float) -> bool:
    if target.startswith("<="):
        return value <= float(target[2:].strip(" x"))
    if target.startswith(">="):
        return value >= float(target[2:].strip(" x"))
    return value == float(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    rows = measured(args.out)
    merge = _load(args.out / "merge.json") or {}
    dry = args.device == "cpu"
    lines = [
        f"gpu check on {merge.get('name', args.device)}"
        + (
            ": CPU dry run, tiny sizes; the targets are for CUDA and not judged here" if dry else ""
        ),
        f"{'row':50s} {'measured':>34s}  {'target':>9s}  verdict",
    ]
    complete = True
    for label, target in TARGETS.items():
        if label == "pytest -m gpu":
            text, ok = pytest_row(args.out / "pytest.xml")
            value = None
            complete &= text != "no result"
        else:
            text, value = rows.get(label, ("no result", None))
            complete &= label in rows
            ok = None if value is None or not target else met(target, value)
        verdict = "-" if dry or ok is None else ("met" if ok else "MISSED")
        if text == "no result":
            verdict = "no result"
        lines.append(f"{label:50s} {text:>34s}  {target:>9s}  {verdict}")
    report = "\n".join(lines) + "\n"
    numbers = {
        "device": merge.get("name", args.device),
        "device_copy_bytes_per_s": (merge.get("device") or {}).get("bandwidth"),
        "host_to_device_bytes_per_s": (merge.get("host") or {}).get("bandwidth"),
        "rows": {label: value for label, (_, value) in rows.items()},
    }
    (args.out / "gpu_check.json").write_text(json.dumps(numbers, indent=1))
    copy, h2d = numbers["device_copy_bytes_per_s"], numbers["host_to_device_bytes_per_s"]
    if not dry and copy and h2d and merge.get("free_bytes"):
        name = str(numbers["device"]).replace(":", " ")
        spec = f"{name}:{merge['free_bytes'] / 2**30:.0f}:{copy / 1e12:.2f}:{h2d / 1e9:.1f}"
        report += f"measured inputs of benchmarks/scale_table.py: --gpu '{spec}'\n"
    (args.out / "gpu_check.txt").write_text(report)
    print(report, end="")
    raise SystemExit(0 if complete else 1)


if __name__ == "__main__":
    main()
