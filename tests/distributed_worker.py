"""One process of a test training run under `accelerate launch` (tests/test_distributed.py).

    python -m tests.distributed_worker CONFIG DATA OUT RECORD [STOP_AT_STEP]

Trains the base role of CONFIG as `demix train --role base` does, optionally stopping at
STOP_AT_STEP, and writes RECORD-rank<R>.json: per step, a digest of each row this process read
and its sampler state afterwards.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from demix.config import load_config
from demix.data.shards import CuratedData, MixtureSampler
from demix.train import train_model


def record_batches(steps: list[dict]):
    """Wrap MixtureSampler.next_batch to append {"rows": [digest, ...], "state": ...} per call."""
    original = MixtureSampler.next_batch

    def next_batch(self, part: int = 0, parts: int = 1):
        batch = original(self, part, parts)
        rows = [hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in batch]
        steps.append({"rows": rows, "state": self.state_dict()})
        return batch

    MixtureSampler.next_batch = next_batch
    return original


def train_base(config_path: str, data_dir: str, out: str, stop_at_step: int | None = None):
    """The base role of `demix train` (demix.stages.base_stage), stoppable."""
    config = load_config(config_path)
    data = CuratedData(data_dir)
    return train_model(
        Path(out),
        data,
        data.token_prior,
        config.train.base,
        config.train,
        config.model,
        config.seed,
        role="base",
        name="base",
        arch=config.model.architecture,
        stop_at_step=stop_at_step,
        quiet=True,
    )


def main(argv: list[str]) -> None:
    import os

    config, data, out, record = argv[:4]
    stop = int(argv[4]) if len(argv) > 4 else None
    steps: list[dict] = []
    record_batches(steps)
    train_base(config, data, out, stop)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{record}-rank{rank}.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    main(sys.argv[1:])
