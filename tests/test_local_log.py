"""A quiet local run: kfp.local's log goes to a file, the screen gets one line per task; a task
that fails is shown on screen with its last lines and the log's path."""

# No `from __future__ import annotations`: KFP reads the components' annotations as types.
import io
import os
import re

import pytest
import yaml
from kfp import dsl

from components.image import CPU_IMAGE
from deploy import local

from .conftest import smoke_config_dict

TASK_LINE = re.compile(r"  (\S.*?)\s+(SUCCESS|FAILURE|CACHED)\s+\d+\.\ds")


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def noisy_step(n: int) -> int:
    """Print a lot, as a task's streamed log does."""
    for i in range(300):
        print(f"noise line {i}")
    return n


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def broken_step(n: int):
    """Fail after a few lines."""
    print("loading the inputs")
    raise ValueError(f"broken at {n}")


@dsl.pipeline(name="quiet-failure")
def failing(config_yaml: str, data_fingerprint: str = "", num_eval_workers: int = 1):
    first = noisy_step(n=num_eval_workers).set_display_name("make noise")
    broken_step(n=first.output).set_display_name("break things")


def test_a_failed_task_is_on_screen_with_its_last_lines_and_the_log(tmp_path, corpus_dir):
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir)))
    screen = io.StringIO()
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        local.run_local(lambda placement: failing, config, out, num_eval_workers=3, progress=screen)
    log = out / "kfp-local.log"
    assert str(stopped.value) == (
        f"pipeline.py: error: the local run failed at break things; the full log: {log}"
    )
    lines = screen.getvalue().splitlines()
    assert lines[0] == f"kfp.local log: {log}"
    shown = [m.groups() for m in map(TASK_LINE.fullmatch, lines) if m]
    assert shown == [("make noise", "SUCCESS"), ("break things", "FAILURE")]
    text = screen.getvalue()
    assert "ValueError: broken at 3" in text and "loading the inputs" in text  # its last lines
    assert "noise line" not in text and len(lines) < 30  # the other task's output is not
    logged = log.read_text()
    assert "noise line 299" in logged and "ValueError: broken at 3" in logged
    assert "executor_output.json" in logged  # kfp.local's executor input, in the file only


def test_task_lines_use_display_names_and_pass_everything_to_the_log():
    log, screen = io.StringIO(), io.StringIO()
    lines = local.TaskLines(log, screen, {"train-model-2": "train component"})
    text = (
        "12:00:00.000 - INFO - Executing task \x1b[96m'train-model-2'\x1b[0m\n"
        "    step 10 loss 3.2\n"
        "12:00:01.000 - INFO - Task \x1b[96m'train-model-2'\x1b[0m finished with status "
        "\x1b[92mSUCCESS\x1b[0m\n"
        "12:00:01.000 - INFO - Task resolve-config cache hit (key=abc); skipping execution.\n"
    )
    for part in (text[:30], text[30:95], text[95:]):  # writes split anywhere
        lines.write(part)
    assert log.getvalue() == text
    shown = [TASK_LINE.fullmatch(line).groups() for line in screen.getvalue().splitlines()]
    assert shown == [("train component", "SUCCESS"), ("resolve-config", "CACHED")]
    assert lines.failed == []


def test_quiet_tasks_restores_standard_output(tmp_path, capfd):
    with local.quiet_tasks(tmp_path / "x.log", {}, io.StringIO()):
        print("to the log")
        os.write(1, b"below python\n")
    print("to the screen")
    assert capfd.readouterr().out == "to the screen\n"
    assert (tmp_path / "x.log").read_text() == "to the log\nbelow python\n"


def test_a_task_that_succeeds_on_a_retry_has_not_failed():
    screen = io.StringIO()
    lines = local.TaskLines(io.StringIO(), screen, {"train-model": "train base"})
    lines.write(
        "Executing task 'train-model'\n"
        "step 1/9\rstep 5/9\rstep 7/9\n"
        "RuntimeError: CUDA out of memory\n"
        "Task 'train-model' finished with status FAILURE\n"
    )
    assert lines.failed == ["train base"]
    assert "  | step 7/9\n  | RuntimeError: CUDA out of memory\n" in screen.getvalue()
    lines.write("Task train-model failed (attempt 1/3). Retrying in 60.0s...\n")
    assert lines.failed == []
    lines.write("Executing task 'train-model'\nTask 'train-model' finished with status SUCCESS\n")
    shown = [m.groups() for m in map(TASK_LINE.fullmatch, screen.getvalue().splitlines()) if m]
    assert shown == [("train base", "FAILURE"), ("train base", "SUCCESS")]
    assert "train base                         retry 1/2 in 60.0s" in screen.getvalue()
    assert lines.failed == []
