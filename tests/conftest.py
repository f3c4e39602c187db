"""Shared fixtures: tiny real corpora, a tiny tokenizer and tiny real Llama models, built once."""

from __future__ import annotations

import json
import os
import random
import re
import sysconfig
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Strings that look like credentials: cloud keys, OAuth tokens, private keys, service accounts.
KEY_LIKE = re.compile(
    r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY|ya29\.[0-9A-Za-z_-]{20,}"
    r"|AIza[0-9A-Za-z_-]{35}|ghp_[0-9A-Za-z]{36}|xox[abprs]-[0-9A-Za-z-]{10,}"
    r"|(?i:private_key|client_secret|refresh_token|aws_secret_access_key)"
)
_EMBEDDED_IMAGE = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+")


def key_like(text: str) -> str | None:
    """The first credential-like string in `text` (embedded base64 images skipped), or None."""
    found = KEY_LIKE.search(_EMBEDDED_IMAGE.sub("", text))
    return found.group(0) if found else None


WORDS = (
    "the a river city council report people year market school north long small old new "
    "said found made went saw told asked would could should must before after during under"
).split()


def _english(rng: random.Random, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(4, 9)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def _math(rng: random.Random, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        docs.append(
            f"Problem:\nCompute ({a} + {b}) * {c}.\n\nSolution:\nFirst {a} + {b} = {a + b}. "
            f"Then {a + b} * {c} = {(a + b) * c}. The answer is $\\boxed{{{(a + b) * c}}}$."
        )
    return docs


def _code(n: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 12_000)
    return [p.read_text(errors="replace") for p in files[:n]]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Three small real-ish domains as jsonl: english prose, python source, math solutions."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for name, docs in (
        ("general", _english(rng, 160)),
        ("code", _code(40)),
        ("math", _math(rng, 240)),
    ):
        with open(root / f"{name}.jsonl", "w") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    return root


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory) -> Path:
    """Tiny eval files in the bundled tasks' formats (ranked choice and bits-per-byte)."""
    root = tmp_path_factory.mktemp("eval")
    rng = random.Random(1)
    with open(root / "basic_skills_arithmetic.jsonl", "w") as f:
        for _ in range(12):
            a, b = rng.randint(2, 50), rng.randint(2, 50)
            choices = [str(a + b), str(a + b + 1), str(a * b), str(abs(a - b))]
            f.write(json.dumps({"query": f"{a} + {b} =", "choices": choices, "gold": 0}) + "\n")
    with open(root / "math500_bpb.jsonl", "w") as f:
        for doc in _math(rng, 12):
            problem, solution = doc.split("\n\nSolution:")
            f.write(
                json.dumps({"context": problem + "\n\nSolution:", "continuation": solution}) + "\n"
            )
    return root


def smoke_config_dict(corpus: Path, eval_data: Path | None = None) -> dict:
    """A run config small enough for an end-to-end test in well under two minutes."""
    categories = {
        "general": ["heldout:general"],
        "math": ["heldout:math"]
        + (["basic_skills_arithmetic", "math500_bpb"] if eval_data else []),
        "code": ["heldout:code"],
    }
    return {
        "seed": 0,
        "data": {
            "datasets": [
                {"name": n, "paths": [str(corpus / f"{n}.jsonl")]}
                for n in ("general", "code", "math")
            ],
            "general": "general",
            "tokenizer": {"vocab_size": 320},
        },
        "model": {
            "architecture": {
                "hidden_size": 32,
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 64,
            }
        },
        "train": {
            "seq_len": 32,
            "batch_size": 8,
            "checkpoint_every": 10,
            "log_every": 5,
            "base": {"tokens": 12_000, "lr": 1e-2},
            "component": {"tokens": 4_000, "lr": 5e-3},
            "final": {"tokens": 4_000, "lr": 5e-3},
        },
        "evaluate": {
            "categories": categories,
            "limit": 8,
            "batch_size": 8,
            "heldout_tokens": 1024,
            **({"data_dir": str(eval_data)} if eval_data else {}),
        },
        "search": {"n": 4, "rounds": 2, "candidates": 500, "top_k": 8},
    }


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the tiny models train fastest so on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- GCS emulator and faults


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real GCS emulator server (gcp-storage-emulator) on loopback, for the session."""
    from .gcs_server import Emulator

    server = Emulator()
    yield server
    server.stop()


@pytest.fixture
def gcs(gcs_emulator, monkeypatch, tmp_path):
    """A fresh bucket behind a fault-injecting proxy; the client and cache point at them.

    Yields the proxy (its `plan` sets faults); `gcs.bucket` is the bucket's name. Retries back
    off from 10 ms so injected faults cost little time; resumable uploads (files above 8 MiB)
    go in 1 MiB chunks.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from . import reliability
    from .gcs_server import FaultProxy

    proxy = FaultProxy(gcs_emulator.port)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    monkeypatch.setenv("DEMIX_GCS_BACKOFF_S", "0.01")
    monkeypatch.setenv("DEMIX_GCS_CHUNK_BYTES", str(1 << 20))
    monkeypatch.setenv("DEMIX_CACHE", str(tmp_path / "cache"))
    proxy.bucket = f"demix-{uuid.uuid4().hex[:12]}"
    # created through the proxy before any fault is planned
    storage.Client(project="demix-test", credentials=AnonymousCredentials()).create_bucket(
        proxy.bucket
    )
    yield proxy
    reliability.count("faults_injected", proxy.plan.injected)
    proxy.stop()


# ---------------------------------------------------------------- reproducible fuzzing

# Hypothesis runs the same way everywhere. `make test` (profile "demix"): derandomized, every
# run tries the same inputs (one fixed seed per test), so CI cannot fail at random.
# `make test-reliability` (DEMIX_FUZZ=long, profile "demix-long"): fresh inputs from one seed for
# the whole session, --hypothesis-seed's or a random one, printed at the end so a failure
# reproduces with `DEMIX_FUZZ=long pytest tests/test_fuzz.py --hypothesis-seed=SEED`; a failure
# also prints its @reproduce_failure blob. Hypothesis keeps no database for either (a
# derandomized or seeded run does not use one), so nothing is written into the checkout.
FUZZ_PROFILE = os.environ.get("DEMIX_FUZZ", "quick")
FUZZ_SEED: int | None = None
settings.register_profile(
    "demix",
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "demix-long", settings.get_profile("demix"), max_examples=1000, derandomize=False
)
settings.load_profile("demix-long" if FUZZ_PROFILE == "long" else "demix")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """The long fuzz run's seed: --hypothesis-seed's, else a fresh one, forced for the session."""
    global FUZZ_SEED
    if FUZZ_PROFILE != "long":
        return
    from hypothesis import core

    given = config.getoption("hypothesis_seed", None)
    FUZZ_SEED = int(given) if given is not None else random.SystemRandom().randrange(2**32)
    core.global_force_seed = FUZZ_SEED


def pytest_terminal_summary(terminalreporter):
    """Print the long fuzz run's seed, and the reliability table when reliability tests ran."""
    from . import reliability

    if FUZZ_SEED is not None:
        terminalreporter.write_line(
            f"hypothesis seed {FUZZ_SEED}: rerun with DEMIX_FUZZ=long and "
            f"--hypothesis-seed={FUZZ_SEED}"
        )
    lines = reliability.table()
    if lines:
        terminalreporter.section("reliability: nothing lost")
        for line in lines:
            terminalreporter.write_line(line)


# ---------------------------------------------------------------- what the user had is never lost

# Files a test planted where a user's files would be (`user_file`), with their bytes. After every
# test, and again when the session ends, each one must still be there, byte for byte: the suite
# itself checks that no command removed or changed what a user had at an output path.
USER_FILES: dict[Path, bytes] = {}
# Lost files that already failed a test: each fails the test that lost it, not every test after.
_REPORTED: set[Path] = set()


@pytest.fixture
def user_file():
    """plant(path, data=None): write a user's file (unique bytes unless given) the suite guards."""

    def plant(path: Path, data: bytes | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = f"a user's notes {uuid.uuid4().hex}\n".encode() if data is None else data
        path.write_bytes(data)
        USER_FILES[path] = data
        return path

    return plant


def lost_user_files() -> list[Path]:
    """The planted user files that are gone or changed."""
    return [p for p, data in USER_FILES.items() if not p.is_file() or p.read_bytes() != data]


@pytest.fixture(autouse=True)
def _user_files_are_kept():
    """After every test: every user file planted so far is still there, byte for byte."""
    yield
    if USER_FILES and (lost := [p for p in lost_user_files() if p not in _REPORTED]):
        _REPORTED.update(lost)
        pytest.fail(f"user files planted by the suite were removed or changed: {lost[:5]}")


def pytest_sessionfinish(session):
    """Check the planted user files once more and count them in the reliability table."""
    from . import reliability

    if USER_FILES:
        lost = lost_user_files()
        reliability.count("user_files_kept", len(USER_FILES) - len(lost))
        reliability.count("artifacts_lost", len(lost))
        if lost:
            session.exitstatus = 1
