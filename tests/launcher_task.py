"""One task of tests/launcher.py, as its pod runs it: the audit hook, then KFP's executor.

    python launcher_task.py FOLDER PROGRAM --executor_input JSON --function_to_execute NAME

LAUNCHER_ALLOWED (JSON list of folders) is what the task may open; the first open or listing
of any other path prints one `launcher:` line and ends the process with exit status 86, so no
`except` in the task can hide it.
"""

import json
import os
import sys

AUDIT_EXIT = 86


def _guard(allowed: list[str]):
    """An audit hook ending the process at an open or listing outside `allowed`."""
    roots = tuple(r.rstrip("/") + "/" for r in allowed)
    exact = {r.rstrip("/") for r in allowed}

    def hook(event: str, args: tuple) -> None:
        if event not in ("open", "os.listdir", "os.scandir"):
            return
        path = args[0] if args else None
        if path is None or isinstance(path, int):
            return
        real = os.path.realpath(os.fsdecode(path))
        if real in exact or real.startswith(roots):
            return
        sys.stderr.write(
            f"launcher: the task opened {real}: not a declared input or output, not in its "
            "folder, the installed code or the system\n"
        )
        sys.stderr.flush()
        os._exit(AUDIT_EXIT)

    return hook


def main() -> None:
    folder, program = sys.argv[1], sys.argv[2]
    sys.addaudithook(_guard(json.loads(os.environ["LAUNCHER_ALLOWED"])))
    from kfp.dsl.types import artifact_types

    # In a pod the launcher puts gs://B/K at /gcs/B/K; here /gcs/ is inside the task's folder.
    artifact_types._GCS_LOCAL_MOUNT_PREFIX = os.path.join(folder, "gcs") + "/"
    from kfp.dsl.executor_main import executor_main

    sys.argv = ["executor_main", "--component_module_path", program, *sys.argv[3:]]
    os.environ["_KFP_RUNTIME"] = "true"
    executor_main()


if __name__ == "__main__":
    main()
