"""Run a COMPILED pipeline the way the Kubeflow v2 launcher does, to test what tasks share there.

Open-source Kubeflow shares nothing between tasks but declared artifacts. This runner walks the
compiled YAML's DAG in dependency order (ParallelFor iterations over list parameters,
dsl.Collected fan-ins, conditions), and runs each task as a pod would:

- in its own EMPTY folder (HOME, TMPDIR, DEMIX_CACHE and HF_HOME inside it), deleted when the
  task ends, as a pod's filesystem is;
- its declared input artifacts downloaded from the artifact store (a bucket of the GCS
  emulator) to the local paths KFP derives from their gs:// URIs (under `<folder>/gcs/`, where
  a pod has `/gcs/`); its declared outputs uploaded to the store when it exits;
- the component's code taken from the compiled YAML and run by KFP's own executor
  (kfp.dsl.executor_main, as the container command does) in a subprocess of this interpreter;
- an audit hook in that subprocess ends the task (exit 86) at the first open or listing of a
  path outside its folder, the installed code and the system's read-only folders;
- with a `TaskCache`, caching as the KFP backend does it (backend/src/v2/cacheutils): a task
  whose key (its resolved input parameters, the IDs of its input artifacts, its output
  definitions, image and command) matches an earlier successful execution is not run and
  hands on that execution's outputs, the same artifacts with the same IDs; a task compiled
  with caching off always runs. Artifact IDs are new for every executed output, so anything
  downstream of an executed task is a cache miss, as on the backend.

A task's parameters and artifact records come back as the launcher would record them in MLMD.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TASK_ENTRY = Path(__file__).with_name("launcher_task.py")
# Read-only folders of the image a pod runs: the system and the interpreter with its packages.
SYSTEM = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys")
AUDIT_EXIT = 86


class TaskCache:
    """The backend's execution cache across runs: {fingerprint: the task's recorded outputs}."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    @staticmethod
    def fingerprint(params: dict, artifacts: dict, component: dict, container: dict) -> str:
        """The cache key: input parameter values, input artifact IDs, output definitions,
        image and command with arguments (placeholders unresolved), as cacheutils builds it."""
        outputs = component.get("outputDefinitions", {})
        key = {
            "inputParameterValues": params,
            "inputArtifactNames": {k: [a["name"] for a in v] for k, v in artifacts.items()},
            "outputArtifactsSpec": {
                k: v["artifactType"] for k, v in outputs.get("artifacts", {}).items()
            },
            "outputParametersSpec": {
                k: v["parameterType"] for k, v in outputs.get("parameters", {}).items()
            },
            "image": container["image"],
            "cmdArgs": [*container["command"], *container["args"]],
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class LauncherError(RuntimeError):
    """A task failed, or the compiled pipeline asks for something this runner does not do."""


class Store:
    """The artifact store: gs://BUCKET/ROOT in the GCS emulator (STORAGE_EMULATOR_HOST)."""

    def __init__(self, bucket: str, root: str = "pipeline-root") -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.client = storage.Client(project="launcher", credentials=AnonymousCredentials())
        self.bucket = self.client.bucket(bucket)
        self.root = f"gs://{bucket}/{root}"

    def key(self, uri: str) -> str:
        """The object name of a gs:// URI in this store's bucket."""
        prefix = f"gs://{self.bucket.name}/"
        if not uri.startswith(prefix):
            raise LauncherError(f"{uri}: not in the store's bucket gs://{self.bucket.name}")
        return uri[len(prefix) :].rstrip("/")

    def upload(self, local: Path, uri: str) -> int:
        """Upload a file to the object `uri`, or every file under a folder to `uri/REL`."""
        key = self.key(uri)
        if local.is_file():
            self.bucket.blob(key).upload_from_filename(str(local))
            return 1
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for path in files:
            self.bucket.blob(f"{key}/{path.relative_to(local).as_posix()}").upload_from_filename(
                str(path)
            )
        return len(files)

    def download(self, uri: str, local: Path) -> int:
        """Download the object `uri` to the file `local`, or the objects under it into a folder.

        Raises LauncherError when nothing is stored at `uri`.
        """
        key = self.key(uri)
        blobs = list(self.client.list_blobs(self.bucket, prefix=key))
        exact = [b for b in blobs if b.name == key]
        if exact:
            local.parent.mkdir(parents=True, exist_ok=True)
            exact[0].download_to_filename(str(local))
            return 1
        under = [b for b in blobs if b.name.startswith(f"{key}/")]
        if not under:
            raise LauncherError(f"{uri}: input artifact has no objects in the store")
        for blob in under:
            dest = local / blob.name[len(key) + 1 :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(dest))
        return len(under)

    def exists(self, uri: str) -> bool:
        """Whether an object is stored at `uri` (a file artifact or a manifest)."""
        return self.bucket.blob(self.key(uri)).exists()


def artifact(uri: str, schema_title: str = "system.Artifact", metadata: dict | None = None):
    """An artifact record as the launcher passes it on: name, URI, type and metadata."""
    return {
        "name": uri.rsplit("/", 1)[-1],
        "uri": uri,
        "type": {"schemaTitle": schema_title},
        "metadata": metadata or {},
    }


@dataclass
class RunningTask:
    """A task's pod: its folder, process and declared outputs, until `wait` collects them."""

    path: str
    folder: Path
    process: subprocess.Popen
    outputs: dict[str, dict]
    output_file: Path
    log: Path
    store: Store
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def kill(self) -> None:
        """SIGKILL the task, as a preempted node does; nothing is uploaded."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait(self) -> dict:
        """Wait for the task; upload its declared outputs, delete its folder, return its record.

        Raises LauncherError naming the task and the last line it printed when it fails.
        """
        rc = self.process.wait()
        self.seconds = time.perf_counter() - self.started
        if rc != 0:
            lines = [line for line in self.log.read_text().splitlines() if line.strip()]
            last = next(
                (line for line in reversed(lines) if line.startswith(("launcher:", "demix."))),
                lines[-1] if lines else "",
            )
            shutil.rmtree(self.folder, ignore_errors=True)
            raise LauncherError(f"task {self.path} failed (exit {rc}): {last} (log: {self.log})")
        executed = json.loads(self.output_file.read_text()) if self.output_file.is_file() else {}
        record = {"parameters": executed.get("parameterValues", {}), "artifacts": {}}
        for key, out in self.outputs.items():
            local = local_path(self.folder, out["uri"])
            if local.exists():
                self.store.upload(local, out["uri"])
            written = executed.get("artifacts", {}).get(key, {}).get("artifacts", [{}])[0]
            # A new artifact, with a new ID (MLMD's), as every executed output is.
            made = {**out, "name": uuid.uuid4().hex, "metadata": written.get("metadata", {})}
            record["artifacts"][key] = [made]
        shutil.rmtree(self.folder)
        return record


def local_path(folder: Path, uri: str) -> Path:
    """The local path KFP gives the artifact `uri` inside a task's folder (`/gcs/...` in a pod)."""
    if not uri.startswith("gs://"):
        raise LauncherError(f"{uri}: the launcher runs gs:// pipeline roots only")
    return folder / "gcs" / uri[len("gs://") :]


class Launcher:
    """Runs the tasks of one compiled pipeline package against an artifact store."""

    def __init__(
        self, package: Path, store: Store, work: Path, cache: TaskCache | None = None
    ) -> None:
        docs = [d for d in yaml.safe_load_all(Path(package).read_text()) if d and "root" in d]
        self.spec = docs[0]
        self.components = self.spec["components"]
        self.executors = self.spec["deploymentSpec"]["executors"]
        self.store = store
        self.work = Path(work)
        self.run_id = f"run-{uuid.uuid4().hex[:8]}"
        self.seconds: dict[str, float] = {}
        self.cache = cache
        self.cached: list[str] = []  # tasks that were cache hits, by path
        self.records: dict[str, dict] = {}  # every container task's record, by path

    # ---------------------------------------------------------------------------- the DAG

    def run(self, arguments: dict) -> dict:
        """Run the whole pipeline with these pipeline parameters; the root tasks' records."""
        defaults = {
            name: spec["defaultValue"]
            for name, spec in self.spec["root"]
            .get("inputDefinitions", {})
            .get("parameters", {})
            .items()
            if "defaultValue" in spec
        }
        return self._run_dag(self.spec["root"], {**defaults, **arguments}, {}, "")

    def _run_dag(self, component: dict, params: dict, artifacts: dict, prefix: str) -> dict:
        tasks = component["dag"]["tasks"]
        done: dict[str, dict | None] = {}
        for name in _dependency_order(tasks):
            task = tasks[name]
            inputs = task.get("inputs", {})
            values = {
                key: self._parameter(spec, params, done, name)
                for key, spec in inputs.get("parameters", {}).items()
            }
            arts = {
                key: self._artifacts(spec, artifacts, done, name)
                for key, spec in inputs.get("artifacts", {}).items()
            }
            condition = task.get("triggerPolicy", {}).get("condition")
            if condition and not _condition(condition, values):
                done[name] = None
                continue
            child = self.components[task["componentRef"]["name"]]
            if "dag" not in child:
                path = f"{prefix}{name}"
                caching = task.get("cachingOptions", {}).get("enableCache", False)
                key = self._cache_key(child, values, arts) if caching else None
                if key is not None and key in self.cache.entries:
                    done[name] = self.records[path] = self.cache.entries[key]
                    self.cached.append(path)
                    continue
                running = self.start(path, task["componentRef"]["name"], values, arts)
                done[name] = self.records[path] = running.wait()
                self.seconds[running.path] = running.seconds
                if key is not None:
                    self.cache.entries[key] = done[name]
                continue
            iterator = task.get("parameterIterator")
            if iterator is None:
                runs = [self._run_dag(child, values, arts, f"{prefix}{name}/")]
            else:
                items = iterator["items"]
                listed = (
                    json.loads(items["raw"]) if "raw" in items else values[items["inputParameter"]]
                )
                runs = [
                    self._run_dag(
                        child, {**values, iterator["itemInput"]: item}, arts, f"{prefix}{name}/{i}/"
                    )
                    for i, item in enumerate(listed)
                ]
            done[name] = _dag_outputs(child, runs, iterated=iterator is not None)
        return done

    def _cache_key(self, component: dict, params: dict, artifacts: dict) -> str | None:
        """The task's cache key, or None when this launcher runs without a cache."""
        if self.cache is None:
            return None
        container = self.executors[component["executorLabel"]]["container"]
        return self.cache.fingerprint(params, artifacts, component, container)

    def _parameter(self, spec: dict, params: dict, done: dict, task: str):
        if "runtimeValue" in spec:
            value = spec["runtimeValue"]["constant"]
            return self.store.root if value == "{{$.pipeline_root}}" else value
        if "componentInputParameter" in spec:
            return params[spec["componentInputParameter"]]
        if "taskOutputParameter" in spec:
            ref = spec["taskOutputParameter"]
            produced = done.get(ref["producerTask"])
            if produced is None:
                raise LauncherError(f"{task}: its producer {ref['producerTask']} did not run")
            return produced["parameters"][ref["outputParameterKey"]]
        raise LauncherError(f"{task}: parameter source {spec} is not run by this launcher")

    def _artifacts(self, spec: dict, artifacts: dict, done: dict, task: str) -> list[dict]:
        if "componentInputArtifact" in spec:
            return artifacts[spec["componentInputArtifact"]]
        if "taskOutputArtifact" in spec:
            ref = spec["taskOutputArtifact"]
            produced = done.get(ref["producerTask"])
            if produced is None:
                raise LauncherError(f"{task}: its producer {ref['producerTask']} did not run")
            return produced["artifacts"][ref["outputArtifactKey"]]
        raise LauncherError(f"{task}: artifact source {spec} is not run by this launcher")

    # ---------------------------------------------------------------------------- one task

    def start(self, path: str, component: str, params: dict, artifacts: dict) -> RunningTask:
        """Start the task `path` (its component `component`) in a fresh empty folder: inputs
        downloaded from the store, KFP's executor in a subprocess under the audit hook."""
        spec = self.components[component]
        container = self.executors[spec["executorLabel"]]["container"]
        command = container["command"]
        if command[:2] != ["sh", "-ec"] or "kfp.dsl.executor_main" not in command[2]:
            raise LauncherError(f"{path}: not a lightweight Python component: {command[:3]}")
        folder = self.work / "pods" / f"{path.replace('/', '.')}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True)
        program = folder / "program" / "ephemeral_component.py"
        program.parent.mkdir()
        program.write_text(command[3])

        definitions = spec.get("inputDefinitions", {})
        values = {}
        for key, pdef in definitions.get("parameters", {}).items():
            if key in params:
                values[key] = _typed(params[key], pdef["parameterType"])
            elif "defaultValue" in pdef:
                values[key] = _typed(pdef["defaultValue"], pdef["parameterType"])
        inputs = {}
        for key, records in artifacts.items():
            for record in records:
                self.store.download(record["uri"], local_path(folder, record["uri"]))
            inputs[key] = {"artifacts": records}
        outputs = {
            key: artifact(
                f"{self.store.root}/{self.run_id}/{path}/{key}",
                adef["artifactType"]["schemaTitle"],
            )
            for key, adef in spec.get("outputDefinitions", {}).get("artifacts", {}).items()
        }
        output_file = folder / "tmp" / "kfp_outputs" / "output_metadata.json"
        executor_input = {
            "inputs": {"parameterValues": values, "artifacts": inputs},
            "outputs": {
                "artifacts": {key: {"artifacts": [out]} for key, out in outputs.items()},
                "parameters": {
                    key: {"outputFile": str(folder / "tmp" / "kfp_outputs" / key)}
                    for key in spec.get("outputDefinitions", {}).get("parameters", {})
                },
                "outputFile": str(output_file),
            },
        }
        args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
        env = _pod_env(folder)
        log = self.work / "logs" / f"{folder.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, str(TASK_ENTRY), str(folder), str(program), *args],
                cwd=folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return RunningTask(path, folder, process, outputs, output_file, log, self.store)


def _pod_env(folder: Path) -> dict[str, str]:
    """The task's environment: this one's, with every home and cache folder inside the pod."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST", "DEMIX_CACHE", "HF_", "XDG_", "TMP", "TEMP"))
    }
    for name in ("home", "tmp", "cache", "hf"):
        (folder / name).mkdir(exist_ok=True)
    env.update(
        PYTHONPATH=str(ROOT),
        HOME=str(folder / "home"),
        TMPDIR=str(folder / "tmp"),
        DEMIX_CACHE=str(folder / "cache"),
        HF_HOME=str(folder / "hf"),
        XDG_CACHE_HOME=str(folder / "cache"),
        HF_HUB_OFFLINE="1",
        MPLCONFIGDIR=str(folder / "home" / "matplotlib"),
        LAUNCHER_ALLOWED=json.dumps(allowed_roots(folder)),
    )
    return env


def allowed_roots(folder: Path) -> list[str]:
    """What a task may open: its own folder, the installed code and the system's folders."""
    code = {
        ROOT,
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(sys.exec_prefix),
        *(Path(p) for p in sysconfig.get_paths().values()),
    }
    roots = {str(folder.resolve()), *SYSTEM, *(os.path.realpath(p) for p in code)}
    return sorted(roots)


def _typed(value, parameter_type: str):
    """A parameter value as the backend hands it over (integers as ints, not floats)."""
    if parameter_type == "NUMBER_INTEGER" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _dependency_order(tasks: dict) -> list[str]:
    """Task names with every producer before its consumers (ties in name order)."""
    needs = {}
    for name, task in tasks.items():
        deps = set(task.get("dependentTasks", []))
        for spec in task.get("inputs", {}).get("parameters", {}).values():
            deps.add(spec.get("taskOutputParameter", {}).get("producerTask"))
        for spec in task.get("inputs", {}).get("artifacts", {}).values():
            deps.add(spec.get("taskOutputArtifact", {}).get("producerTask"))
        needs[name] = deps & set(tasks)
    order: list[str] = []
    while len(order) < len(tasks):
        ready = sorted(n for n in tasks if n not in order and needs[n] <= set(order))
        if not ready:
            raise LauncherError(f"tasks in a cycle: {sorted(set(tasks) - set(order))}")
        order.append(ready[0])
    return order


_CONDITION = re.compile(r"^inputs\.parameter_values\['([^']+)'\]\s*(==|!=)\s*(.+)$")


def _condition(text: str, values: dict) -> bool:
    """The value of a compiled dsl.If condition (`inputs.parameter_values['X'] == literal`).

    Raises LauncherError for any other expression.
    """
    match = _CONDITION.match(text.strip())
    if not match:
        raise LauncherError(f"condition {text!r} is not run by this launcher")
    name, op, literal = match.groups()
    literal = literal.strip()
    expected = literal[1:-1] if literal[:1] in "'\"" else json.loads(literal)
    return (values[name] == expected) == (op == "==")


def _dag_outputs(component: dict, runs: list[dict], iterated: bool) -> dict:
    """A sub-DAG's outputs: each selected artifact, over all iterations of a loop (Collected)."""
    out: dict = {"parameters": {}, "artifacts": {}}
    for key, spec in component["dag"].get("outputs", {}).get("artifacts", {}).items():
        collected = []
        for run in runs:
            for selector in spec["artifactSelectors"]:
                produced = run.get(selector["producerSubtask"])
                if produced is not None:
                    collected += produced["artifacts"][selector["outputArtifactKey"]]
        out["artifacts"][key] = collected
    for key, spec in component["dag"].get("outputs", {}).get("parameters", {}).items():
        source = spec.get("valueFromParameter")
        if source is None:
            raise LauncherError(f"DAG output {key}: {spec} is not run by this launcher")
        values = [
            run[source["producerSubtask"]]["parameters"][source["outputParameterKey"]]
            for run in runs
        ]
        out["parameters"][key] = values if iterated else values[0]
    return out
