"""One writer per output, forced interleavings: a first command runs as a child process that
stops itself at a named point (DEMIX_STOP_AT, SIGSTOP; the test waits for the stop with
waitpid), a second command or a user acts while it is stopped, then the first continues
(SIGCONT). No sleeps: every step waits for a state the other side has reached.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from demix.cli import main
from demix.storage import read_manifest, write_manifest
from demix.storage.locks import LOCK_SUFFIX

from . import reliability
from .conftest import smoke_config_dict

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(corpus_dir, tmp_path_factory):
    """A config and a curated dataset."""
    root = tmp_path_factory.mktemp("concurrency")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(smoke_config_dict(corpus_dir)))
    assert main(["curate", str(config), "--out", str(root / "data")]) == 0
    return {"config": str(config), "data": str(root / "data")}


def _train(setup: dict, out: Path) -> list[str]:
    return ["train", setup["config"], "--role", "base", "--data", setup["data"], "--out", str(out)]


def _curate(setup: dict, out: Path) -> list[str]:
    return ["curate", setup["config"], "--out", str(out)]


def _stopped(argv: list[str], point: str) -> subprocess.Popen:
    """`demix argv` in a child process, returned once it has stopped itself at `point`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "DEMIX_STOP_AT": point, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "demix.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status = os.waitpid(child.pid, os.WUNTRACED)  # returns when it stops (or ends)
    if not os.WIFSTOPPED(status):
        child.returncode = os.waitstatus_to_exitcode(status)
        pytest.fail(f"the child never reached {point!r}: {child.stderr.read()[-2000:]}")
    return child


def _continued(child: subprocess.Popen) -> tuple[int, str]:
    """Continue a stopped child; its exit code and standard error when it has ended."""
    os.kill(child.pid, signal.SIGCONT)
    _, err = child.communicate(timeout=300)
    return child.returncode, err


def _error_line(capsys, argv: list[str]) -> str:
    """Run argv here: it must exit 2 with one `demix: error:` line, returned."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _weights(folder: Path) -> dict[str, str]:
    """sha256 of every weights and config file the model's manifest lists."""
    files = read_manifest(folder)["files"]
    return {n: e["sha256"] for n, e in files.items() if n.endswith((".safetensors", ".json"))}


def _tiny_model(setup: dict, folder: Path) -> Path:
    """A tiny untrained model with the dataset's tokenizer (a plain Hugging Face folder)."""
    from demix.config import ArchitectureConfig
    from demix.data.shards import CuratedData
    from demix.model import build_tiny_llama

    tok = CuratedData(setup["data"]).load_tokenizer()
    spec = ArchitectureConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    build_tiny_llama(spec, len(tok), tok.eos_token_id, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.slow  # two trainings, one of them in a fresh process
def test_two_trains_on_one_out_one_wins_and_equals_a_solo_run(setup, tmp_path, capsys):
    solo, out = tmp_path / "solo", tmp_path / "race"
    first = _stopped(_train(setup, out), "locked")
    line = _error_line(capsys, _train(setup, out))
    holder = f"{first.pid}@{socket.gethostname()}"
    assert str(out) in line and holder in line and "--wait-lock" in line, line
    code, err = _continued(first)
    assert code == 0, err[-2000:]
    assert main(_train(setup, solo)) == 0
    files = {n for n in _weights(solo) if n != "training_log.json"}  # its timings differ
    reliability.intact(
        {n: _weights(out)[n] for n in files} == {n: _weights(solo)[n] for n in files},
        "the winner's model differs from a solo run's",
    )
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["race", "solo"], left  # no lock, checkpoint or temporary left
    reliability.count("second_writers")


@pytest.mark.parametrize("what", ["user folder", "dataset artifact"])
def test_what_appears_at_train_out_mid_run_is_kept_and_refused(
    what, setup, tmp_path, capsys, user_file
):
    out = tmp_path / "model"
    child = _stopped(_train(setup, out), "publish")  # a checkpoint or the model, not renamed
    if what == "user folder":
        user_file(out / "notes.txt")
        user_file(out / "drafts" / "plan.md")
    else:
        (out / "shard").mkdir(parents=True)
        (out / "shard" / "train.bin").write_bytes(os.urandom(64))
        write_manifest(out, "demix.dataset")
    before = _tree(out)
    code, err = _continued(child)
    lines = [line for line in err.splitlines() if line.startswith("demix: error:")]
    assert code == 2 and len(lines) == 1 and str(out) in lines[0], err[-2000:]
    reliability.intact(_tree(out) == before, f"train changed the {what} at {out}")
    assert not Path(f"{out}{LOCK_SUFFIX}").exists()
    reliability.count("appeared_kept")


@pytest.mark.slow  # evaluation in a fresh process (lm-eval's import alone takes seconds)
def test_a_user_file_appearing_at_evaluate_out_mid_run_is_not_overwritten(
    setup, tmp_path, capsys, user_file
):
    model = _tiny_model(setup, tmp_path / "m")
    out = tmp_path / "scores.json"
    argv = ["evaluate", setup["config"], "--data", setup["data"], "--models", str(model)]
    child = _stopped([*argv, "--out", str(out)], "publish")
    user_file(out, b'{"my": "own results"}\n')
    code, err = _continued(child)
    assert code == 2 and "appeared while this command ran" in err, err[-2000:]
    assert out.read_bytes() == b'{"my": "own results"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "scores.json"]
    reliability.count("appeared_kept")


def test_two_curates_never_remove_each_other_s_scratch(setup, tmp_path, capsys):
    from demix.config import load_config
    from demix.data.curate import curate

    out = tmp_path / "data"
    first = _stopped(_curate(setup, out), "publish")  # a group written into its scratch
    scratch = sorted(tmp_path.glob(".data.curate-*"))
    assert len(scratch) == 1 and any(scratch[0].iterdir())
    mine = _tree(scratch[0])
    line = _error_line(capsys, _curate(setup, out))  # the command: the lock refuses it
    assert f"{first.pid}@{socket.gethostname()}" in line, line
    config = load_config(setup["config"])
    curate(config.data, out, config.seed)  # the library, unlocked: it keeps the live scratch
    reliability.intact(_tree(scratch[0]) == mine, "a second curate removed the first's scratch")
    code, err = _continued(first)
    assert code == 0, err[-2000:]
    assert read_manifest(out, "demix.dataset", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # each removed its own
    reliability.count("second_writers")


def test_a_stale_lock_of_a_killed_command_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    summary = {
        "datasets": ["a", "b"],
        "token_prior": {"a": 0.5, "b": 0.5},
        "dataset_train_tokens": {"a": 100, "b": 100},
        "final_tokens": 1000,
        "mixture": {"a": 0.25, "b": 0.75},
        "component_weights": {"a": 0.25, "b": 0.75},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "mix.json"
    stale = f"{dead.pid}@{socket.gethostname()}"
    Path(f"{out}{LOCK_SUFFIX}").write_text(stale + "\n")  # what a killed holder leaves
    assert main(["export", str(run), "--format", "json", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {stale}" in err, err
    assert json.loads(out.read_text())["mixture"] == summary["mixture"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.json", "run"]
    reliability.count("stale_locks")


def test_gs_outputs_are_locked_with_a_create_only_object(
    tmp_path, gcs, capsys, caplog, monkeypatch
):
    from demix import gcs as gcs_io
    from demix.storage.locks import LockHeld, OutputLock

    uri = f"gs://{gcs.bucket}/merged"
    first = OutputLock(uri)
    first.acquire()
    bkt = gcs_io.bucket(gcs.bucket)
    assert gcs_io.read_bytes(bkt, f"merged{LOCK_SUFFIX}").decode().startswith(f"{os.getpid()}@")
    other = subprocess.run(  # another process: the object exists, it refuses naming us
        [
            sys.executable,
            "-c",
            f"from demix.storage.locks import OutputLock\nOutputLock({uri!r}).acquire()",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert "LockHeld" in other.stderr and f"{os.getpid()}@" in other.stderr, other.stderr[-2000:]
    first.release()
    assert gcs_io.read_bytes(bkt, f"merged{LOCK_SUFFIX}") is None
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "lock"
    path.write_text(f"{dead.pid}@{socket.gethostname()}\n")
    gcs_io.upload_file(bkt, f"merged{LOCK_SUFFIX}", path)  # left by a killed command
    taken = OutputLock(uri)
    taken.acquire()  # taken over
    assert gcs_io.read_bytes(bkt, f"merged{LOCK_SUFFIX}").decode().startswith(f"{os.getpid()}@")
    taken.release()
    path.write_text("1@another-host\n")
    gcs_io.upload_file(bkt, f"merged{LOCK_SUFFIX}", path)
    with pytest.raises(LockHeld):  # another host's holder, refreshed lately: it may run
        OutputLock(uri).acquire()
    monkeypatch.setenv("DEMIX_LOCK_STALE_S", "0")  # every lock not ours counts as silent
    silent = OutputLock(uri)
    silent.acquire()  # a machine gone with its process (a preempted pod): taken over
    assert "took over the lock of 1@another-host, which silent for" in caplog.text
    created = bkt.get_blob(f"merged{LOCK_SUFFIX}")
    silent.refresh(bkt.blob(f"merged{LOCK_SUFFIX}"))  # one heartbeat: the object is rewritten
    refreshed = bkt.get_blob(f"merged{LOCK_SUFFIX}")
    assert refreshed.updated >= created.updated and refreshed.generation != created.generation
    assert gcs_io.read_bytes(bkt, f"merged{LOCK_SUFFIX}").decode().startswith(f"{os.getpid()}@")
    silent.release()
    monkeypatch.delenv("DEMIX_LOCK_STALE_S")
    gcs_io.delete(bkt, f"merged{LOCK_SUFFIX}")
    run = tmp_path / "run"  # a command locks and releases its gs:// output the same way
    run.mkdir()
    mixture = {"a": 0.5, "b": 0.5}
    summary = {"datasets": ["a", "b"], "mixture": mixture, "component_weights": mixture}
    summary |= {"token_prior": mixture, "dataset_train_tokens": {"a": 9, "b": 9}}
    (run / "summary.json").write_text(json.dumps({**summary, "final_tokens": 90}))
    out = f"gs://{gcs.bucket}/mix.json"
    assert main(["export", str(run), "--format", "json", "--out", out]) == 0
    assert sorted(gcs_io.list_blobs(bkt, "")) == ["mix.json"]
    reliability.count("stale_locks")
    reliability.count("second_writers")


def _search(setup: dict, base: str, out: Path) -> list[str]:
    components = [f"{n}={base}" for n in ("general", "code", "math")]
    argv = ["search", setup["config"], "--data", setup["data"], "--base", base]
    return [*argv, "--components", *components, "--out", str(out)]


def test_sigterm_removes_what_the_command_made_and_nothing_else(setup, tmp_path, capsys, user_file):
    out = tmp_path / "runs" / "search"  # `runs` does not exist: the command makes it
    child = _stopped(_search(setup, str(tmp_path / "no-base-needed"), out), "locked")
    assert (out / "demix-output.json").is_file()  # claimed before any work
    notes = user_file(tmp_path / "runs" / "notes.txt")  # a user's file beside it meanwhile
    os.kill(child.pid, signal.SIGTERM)  # delivered when it continues
    code, err = _continued(child)
    assert code == 143 and "terminated" in err, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert sorted(p.name for p in notes.parent.iterdir()) == ["notes.txt"]  # search, lock: gone
    reliability.count("outputs_removed")


def test_an_internal_error_removes_only_what_the_command_made(
    setup, tmp_path, capsys, monkeypatch, user_file
):
    import demix.stages

    base = _tiny_model(setup, tmp_path / "base")
    out = tmp_path / "a" / "b" / "merged"  # `a` does not exist: the command makes a and b

    def fails(*args, **kwargs):
        user_file(out / "notes.txt")  # a user's folder appears at the output meanwhile
        raise RuntimeError("a bug")

    monkeypatch.setattr(demix.stages, "merge_stage", fails)
    components = [f"{n}={base}" for n in ("general", "code", "math")]
    argv = ["merge", setup["config"], "--data", setup["data"], "--base", str(base)]
    argv += ["--components", *components, "--mixture", "general=0.4,code=0.3,math=0.3"]
    assert main([*argv, "--out", str(out)]) == 3
    assert "internal error" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # kept, with its folders
    assert sorted(p.name for p in out.parent.iterdir()) == ["merged"]  # no lock left
    monkeypatch.setattr(demix.stages, "merge_stage", lambda *a, **k: 1 / 0)
    assert main([*argv, "--out", str(tmp_path / "c" / "d" / "merged")]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "base"]  # c/d made, removed
    reliability.count("appeared_kept")
    reliability.count("outputs_removed")


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether process `pid` waits for a file lock (a "->" waiter line of /proc/locks)."""
    return any(
        line.split()[1:5] == ["->", "FLOCK", "ADVISORY", "WRITE"] and line.split()[5] == str(pid)
        for line in Path("/proc/locks").read_text().splitlines()
    )


def test_wait_lock_waits_for_the_first_writer_then_writes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    mixture = {"a": 0.5, "b": 0.5}
    summary = {"datasets": ["a", "b"], "mixture": mixture, "component_weights": mixture}
    summary |= {"token_prior": mixture, "dataset_train_tokens": {"a": 9, "b": 9}}
    (run / "summary.json").write_text(json.dumps({**summary, "final_tokens": 90}))
    out = tmp_path / "mix.txt"
    argv = ["export", str(run), "--out", str(out), "--format"]
    first = _stopped([*argv, "megatron"], "locked")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    second = subprocess.Popen(
        [sys.executable, "-m", "demix.cli", *argv, "olmo", "--wait-lock"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not _blocked_on_a_lock(second.pid):  # a state, not a delay: it waits in flock
        assert second.poll() is None, second.stderr.read()
        os.sched_yield()
    code, err = _continued(first)
    assert code == 0, err
    assert second.wait(timeout=120) == 0, second.stderr.read()
    assert out.read_text().startswith("# demix export: an OLMo-core")  # the second wrote last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.txt", "run"]
    reliability.count("second_writers")
