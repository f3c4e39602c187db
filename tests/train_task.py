"""One `train model` pipeline task as its pod runs it, for tests/test_distributed_publish.py.

    python -m tests.train_task POD CONFIG DATA MODEL_URI PROCESSES

Runs the component body (components/train_model.py) for the base role with PROCESSES training
processes, its output Model at the gs:// MODEL_URI. As on Kubeflow, the model's local path is
derived from its URI under the pod's own folder POD (`POD/gcs/...`, where a pod has /gcs/), so
a rerun in a new POD starts with nothing on disk but what it fetches from the bucket.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    pod, config, data, model_uri, processes = argv
    from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model
    from kfp.dsl.types import artifact_types

    artifact_types._GCS_LOCAL_MOUNT_PREFIX = str(Path(pod) / "gcs") + "/"
    from components.train_model import train_model

    def local(cls, path: str):
        art = cls(uri=path)
        art.path = path
        return art

    model = Model(uri=model_uri)
    Path(model.path).parent.mkdir(parents=True, exist_ok=True)  # as the launcher does
    train_model.python_func(
        config=local(Artifact, config),
        role="base",
        name="base",
        data=local(Dataset, data),
        model=model,
        metrics=local(Metrics, str(Path(pod) / "metrics")),
        curves=local(HTML, str(Path(pod) / "curves.html")),
        processes=int(processes),
    )
    print(model.path)


if __name__ == "__main__":
    main(sys.argv[1:])
