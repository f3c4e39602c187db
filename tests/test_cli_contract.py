"""One CLI style on both front doors (`demix` and `pipeline.py`): every flag has help, both say
their version, the config is a positional with `--set` beside it, and a bad input is one line."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import yaml

import pipeline
from demix import __version__
from demix.cli import build_parser as demix_parser
from demix.cli import main as demix_main
from deploy.cli import build_parser as pipeline_parser


def _commands(parser: argparse.ArgumentParser, path: str = ""):
    """(command path, parser) of every subcommand, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{path} {name}".strip(), sub
                yield from _commands(sub, f"{path} {name}")


FRONT_DOORS = {"demix": demix_parser, "pipeline.py": lambda: pipeline_parser("DeMix")}


@pytest.mark.parametrize("door", FRONT_DOORS)
def test_every_flag_and_command_says_what_it_is(door):
    parser = FRONT_DOORS[door]()
    silent = []
    for name, sub in [("", parser), *_commands(parser)]:
        if name and not (sub.description or "").strip():
            silent.append(f"{door} {name}: no description")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not (action.help or "").strip():
                silent.append(f"{door} {name} {'/'.join(action.option_strings) or action.dest}")
    assert not silent, silent


@pytest.mark.parametrize("door", ["demix", "pipeline.py"])
def test_both_front_doors_say_their_version(door):
    from pathlib import Path

    argv = [str(Path(sys.executable).parent / "demix")] if door == "demix" else [sys.executable]
    argv += ["pipeline.py"] if door == "pipeline.py" else []
    done = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [door, __version__]


def test_the_config_is_a_positional_with_set_on_both_front_doors():
    run = demix_parser().parse_args(["run", "c.yaml", "--out", "o", "--set", "seed=3"])
    local = pipeline_parser("DeMix").parse_args(
        ["run-local", "c.yaml", "--out", "o", "--set", "seed=3"]
    )
    submit = pipeline_parser("DeMix").parse_args(
        ["submit", "c.yaml", "--package", "p.yaml", "--host", "h", "--set", "seed=3"]
    )
    assert (run.config, run.set) == (local.config, local.set) == ("c.yaml", ["seed=3"])
    assert (submit.config, submit.set) == ("c.yaml", ["seed=3"])
    # the earlier spelling still works
    older = pipeline_parser("DeMix").parse_args(["run-local", "--config", "c.yaml", "--out", "o"])
    assert older.config_flag == "c.yaml"


def test_one_name_per_concept_processes_is_accelerator_count():
    parse = demix_parser().parse_args
    base = ["train", "c.yaml", "--role", "base", "--data", "d", "--out", "o"]
    assert parse([*base, "--accelerator-count", "4"]).processes == 4
    assert parse([*base, "--processes", "4"]).processes == 4


def _one_error_line(err: str, program: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"{program}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run-local", "--out", "o"], "give CONFIG (or --config) once"),
        (["run-local", "a.yaml", "--config", "b.yaml", "--out", "o"], "give CONFIG"),
    ],
)
def test_run_local_needs_exactly_one_config(argv, expected, capsys):
    assert pipeline.main(argv) == 2
    assert expected in _one_error_line(capsys.readouterr().err, "pipeline.py")


def test_a_bad_set_is_the_same_one_line_on_both_front_doors(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"seed": 0}))
    assert demix_main(["run", str(config), "--out", str(tmp_path / "a"), "--set", "seed"]) == 2
    from_demix = _one_error_line(capsys.readouterr().err, "demix")
    argv = ["run-local", str(config), "--out", str(tmp_path / "b"), "--set", "seed"]
    assert pipeline.main(argv) == 2
    from_pipeline = _one_error_line(capsys.readouterr().err, "pipeline.py")
    assert from_demix.split("error:")[1] == from_pipeline.split("error:")[1]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_local_never_writes_into_a_folder_demix_did_not_write(tmp_path, capsys):
    """`pipeline.py run-local --out` holds to the output rule of `demix run`: a folder holding a
    user's files is refused in one line before anything runs, and left as it was."""
    from tests.conftest import smoke_config_dict

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(tmp_path / "corpus")))
    out = tmp_path / "notes"
    out.mkdir()
    (out / "summary.json").write_text("my own summary\n")
    assert pipeline.main(["run-local", str(config), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err, "pipeline.py")
    assert str(out) in line and "demix did not write" in line
    assert [p.name for p in out.iterdir()] == ["summary.json"]
    assert (out / "summary.json").read_text() == "my own summary\n"
