"""benchmarks/gpu_check.sh --cpu: the GPU check's dry run on the CPU (tiny sizes, generated
evaluation data) runs every step and reports every row."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report_rows() -> list[str]:
    spec = importlib.util.spec_from_file_location(
        "gpu_check_report", ROOT / "benchmarks" / "gpu_check_report.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.TARGETS)


@pytest.mark.slow
def test_the_cpu_dry_run_reports_every_row(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = (out / "gpu_check.txt").read_text()
    rows = _report_rows()
    assert len(rows) == 13 and "host-streamed proxy, linear / transfer floor" in rows
    for row in rows:
        line = next((line for line in report.splitlines() if line.startswith(row)), None)
        assert line is not None and "no result" not in line, (row, report)
    assert (out / "gpu_check.json").is_file()
