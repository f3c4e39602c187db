"""The entry point of every process of a launched training job (demix.stages.launch):

    python -m demix.stages.worker JOB [--processes N]

and `train_process`, one process's part of a training job, which `demix train` runs too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from demix.config import RunConfig, resolve_config
from demix.errors import report_error
from demix.logs import configure_logging
from demix.stages.launch import JOB_SUFFIX, MODULE, TrainJob
from demix.stages.train import train_stage


def train_process(
    config: RunConfig,
    role: str,
    out_uri: str,
    name: str | None,
    data_uri: str,
    init_uri: str | None,
    mixture: dict[str, float] | None,
    publish_uri: str = "",
) -> None:
    """One process's part of a training job, in `demix train` and in a launched job alike.

    Each machine's first process fetches the inputs into the machine's cache first; the main
    process publishes the output and its checkpoints (at `publish_uri`.ckpt for a local output
    published there, beside a gs:// output otherwise), every process resumes from the newest
    one. `name` None: the output folder's name (a reference's).
    """
    from demix.base_model import model_folder
    from demix.data.shards import DATASET_KIND, CuratedData
    from demix.distributed import node_first
    from demix.mixtures import validate_mixture
    from demix.storage import (
        artifact_output,
        checkpoint_sync,
        discard_checkpoint,
        fetch_artifact,
    )

    main = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as stack:
        with node_first(config.train):
            data = CuratedData(fetch_artifact(data_uri, DATASET_KIND))
            if mixture is not None:  # before fetching the base: fail fast
                validate_mixture(mixture, data.names)
            init = model_folder(init_uri) if init_uri else None
            out = stack.enter_context(artifact_output(out_uri, publish=main))
            if publish_uri:  # fetched into the folder the loop resumes from
                publish = checkpoint_sync(publish_uri, out.with_name(out.name + ".ckpt"))
            else:
                publish = checkpoint_sync(out_uri)
        name = out.name if name is None else name
        train_stage(config, data, role, out, name, init, mixture, on_checkpoint=publish)
    if main:
        discard_checkpoint(publish_uri or out_uri)


def run_job(path: Path, processes: int = 1) -> None:
    """Run the job at `path` in this process, or, outside accelerate with several processes on
    this machine or several machines (a Vertex AI replica), launch this machine's processes."""
    from demix.distributed import cluster_from_env, launched, run_launched

    job = TrainJob.read(path)
    configure_logging(job.verbose)  # each process's log lines, as `demix train` shows them
    config = resolve_config(job.config, source=str(path))
    cluster = cluster_from_env()
    if not launched() and processes * (cluster.nodes if cluster else 1) > 1:
        run_launched([str(path)], processes, cluster, module=MODULE)
        return
    train_process(
        config, job.role, job.out, job.name, job.data, job.init, job.mixture, job.publish_uri
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m demix.stages.worker JOB [--processes N]`; the exit code (the error contract
    of `demix`: one line `demix: error: ...`, which the launching process reports)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description="Run one launched training job."
    )
    parser.add_argument("job", type=Path, help=f"the job file (<out>{JOB_SUFFIX})")
    parser.add_argument("--processes", type=int, default=1, help="processes on this machine")
    args = parser.parse_args(argv)
    try:
        run_job(args.job, args.processes)
    except Exception as err:  # noqa: BLE001 (the error contract: one line, an exit code)
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
