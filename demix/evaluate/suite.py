"""The lm-eval task suite of a run: bundled offline demo tasks plus any lm-eval task name.

The bundled task YAMLs in `tasks/` are templates (their data files are only known at run time):
they are rendered for one eval data folder into a private include folder and loaded from there
with `TaskManager(include_defaults=False)`, which indexes in milliseconds instead of the ~11 s
lm-eval spends indexing its built-in tasks. Built-in tasks are indexed only when the config names
one, once per process. Precedence for a name: the config's include_path, then the bundled tasks,
then lm-eval's.

demix runs with the Hugging Face hub offline: a task's dataset must be a local file or already in
the datasets cache. What lm-eval raises while building a task (a dataset not cached, a data file
missing, a template naming a field the documents lack) becomes one TaskError line naming the task
(`explain_task_error`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from demix.data.sources import read_json_line
from demix.errors import TaskError

TEMPLATE_DIR = Path(__file__).parent / "tasks"

RANKED_CHOICE = "ranked_choice"
BITS_PER_BYTE = "bits_per_byte"

BUNDLED_TASKS: dict[str, str] = {
    "arc_easy": RANKED_CHOICE,
    "hellaswag": RANKED_CHOICE,
    "basic_skills_arithmetic": RANKED_CHOICE,
    "basic_skills_coding": RANKED_CHOICE,
    "gsm8k_bpb": BITS_PER_BYTE,
    "math500_bpb": BITS_PER_BYTE,
    "humaneval_bpb": BITS_PER_BYTE,
    "mbpp_bpb": BITS_PER_BYTE,
}

_FETCH_HINT = (
    "run `demix data fetch-demo --out data/` or point evaluate.data_dir at the eval folder"
)
_LIST_HINT = "see the bundled tasks {bundled} and lm-eval's with `lm-eval ls tasks`"
_OFFLINE_HINT = (
    "give the task as a local YAML with its data files (dataset_path: json) under "
    "evaluate.include_path, or fill a Hugging Face datasets cache where the hub is reachable and "
    "point HF_HOME (or HF_DATASETS_CACHE) at it"
)
# lm-eval's Task methods that render a document with the task's templates (YAML keys alike).
_TEMPLATE_FIELDS = ("doc_to_text", "doc_to_target", "doc_to_choice", "doc_to_prefix")


@dataclass
class TaskSuite:
    """lm-eval tasks loaded once: the task dict for `evaluate`, each name's leaf tasks and groups,
    and the eval file of each bundled task."""

    task_dict: dict[str, Any]
    leaves: dict[str, list[str]]
    files: dict[str, Path]
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)

    def task_dict_for(self, names: list[str]) -> dict[str, Any]:
        """The task dict (tasks, groups, group_map) of some of the suite's names only."""
        tasks = self.task_dict["tasks"]
        leaves = {leaf for name in names for leaf in self.leaves[name]}
        groups = {g: group for name in names for g, group in self.groups.get(name, {}).items()}
        group_map = {g: m for g, m in self.task_dict["group_map"].items() if g in groups}
        return {
            "tasks": {leaf: task for leaf, task in tasks.items() if leaf in leaves},
            "groups": groups,
            "group_map": group_map,
        }


def check_eval_file(path: Path, kind: str) -> int:
    """Validate one bundled task's jsonl file and return its number of documents.

    Raises TaskError when the file is missing, a line is not a valid record, or it is empty.
    """
    task = path.stem
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskError(f"{path}: eval file of task {task!r} is missing; {_FETCH_HINT}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TaskError(f"{path}: cannot read eval file of task {task!r} ({err})") from None
    count = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = read_json_line(line, where, TaskError)
        except TaskError as err:
            raise TaskError(f"{err}; {_FETCH_HINT}") from None
        if kind == RANKED_CHOICE:
            _check_ranked_choice(record, where)
        else:
            _check_bits_per_byte(record, where)
        count += 1
    if count == 0:
        raise TaskError(f"{path}: task {task!r} has no documents; {_FETCH_HINT}")
    return count


def _check_ranked_choice(record: Any, where: str) -> None:
    shape = 'expected {"query": str, "choices": [str, ...], "gold": int}'
    if not isinstance(record, dict) or not isinstance(record.get("query"), str):
        raise TaskError(f"{where}: missing or non-string 'query'; {shape}")
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise TaskError(f"{where}: 'choices' must be a non-empty list of strings; {shape}")
    gold = record.get("gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise TaskError(f"{where}: 'gold' must index 'choices' (0..{len(choices) - 1}); {shape}")


def _check_bits_per_byte(record: Any, where: str) -> None:
    shape = 'expected {"context": str, "continuation": str}'
    if not isinstance(record, dict) or not isinstance(record.get("context"), str):
        raise TaskError(f"{where}: missing or non-string 'context'; {shape}")
    continuation = record.get("continuation")
    if not isinstance(continuation, str) or not continuation:
        raise TaskError(f"{where}: 'continuation' must be a non-empty string; {shape}")


def render_bundled_tasks(eval_data_dir: Path, out_dir: Path, cache_dir: Path) -> None:
    """Write the bundled task YAMLs for `eval_data_dir` (and their helper module) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for template in sorted(TEMPLATE_DIR.glob("*.yaml")):
        text = template.read_text(encoding="utf-8")
        # The placeholders sit inside double-quoted YAML scalars, so a JSON-escaped path is valid.
        text = text.replace("@EVAL_DIR@", _yaml_quoted(eval_data_dir.resolve()))
        text = text.replace("@CACHE_DIR@", _yaml_quoted(cache_dir.resolve()))
        (out_dir / template.name).write_text(text, encoding="utf-8")
    shutil.copy2(TEMPLATE_DIR / "demix_metrics.py", out_dir / "demix_metrics.py")


def _yaml_quoted(path: Path) -> str:
    return json.dumps(str(path))[1:-1]


@functools.cache
def _builtin_task_manager() -> Any:
    """lm-eval's TaskManager over its built-in tasks, indexed once per process (~11 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=True)


def load_task_suite(
    names: list[str],
    workdir: Path,
    eval_data_dir: Path | None = None,
    include_path: str | None = None,
) -> TaskSuite:
    """Build the lm-eval tasks for `names` once (bundled ones read from eval_data_dir).

    Raises TaskError for unknown names, tags, a missing eval_data_dir or eval file, tasks
    without documents, and the task-building failures `explain_task_error` explains (a dataset
    not available offline, a missing data file, a template error on the first document).
    """
    from lm_eval.tasks import TaskManager

    remaining = list(dict.fromkeys(names))
    files: dict[str, Path] = {}
    managers: list[tuple[Any, list[str]]] = []

    if include_path is not None:
        if not Path(include_path).exists():
            raise TaskError(
                f"evaluate.include_path: {include_path} does not exist; give a folder of "
                f"lm-eval task YAMLs or remove the key"
            )
        user = TaskManager(include_path=include_path, include_defaults=False)
        managers.append((user, [n for n in remaining if n in user.task_index]))
        remaining = [n for n in remaining if n not in user.task_index]

    bundled = [n for n in remaining if n in BUNDLED_TASKS]
    if bundled:
        if eval_data_dir is None:
            raise TaskError(
                f"tasks {bundled} are bundled demo tasks but no eval_data_dir was given; "
                f"{_FETCH_HINT}"
            )
        for name in bundled:
            files[name] = Path(eval_data_dir) / f"{name}.jsonl"
            check_eval_file(files[name], BUNDLED_TASKS[name])
        rendered = workdir / "tasks"
        render_bundled_tasks(Path(eval_data_dir), rendered, workdir / "hf_datasets")
        managers.append((TaskManager(include_path=str(rendered), include_defaults=False), bundled))
        remaining = [n for n in remaining if n not in BUNDLED_TASKS]

    if remaining:
        builtin = _builtin_task_manager()
        unknown = [n for n in remaining if n not in builtin.task_index]
        if unknown:
            raise TaskError(
                f"unknown evaluation tasks {unknown} in evaluate.categories; "
                + _LIST_HINT.format(bundled=sorted(BUNDLED_TASKS))
            )
        managers.append((builtin, remaining))

    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    group_map: dict[str, list[str]] = {}
    leaves: dict[str, list[str]] = {}
    groups_of: dict[str, dict[str, Any]] = {}
    for manager, wanted in managers:
        for name in wanted:
            if name in manager.all_tags:
                raise TaskError(
                    f"evaluation task {name!r} is an lm-eval tag (a list of tasks without an "
                    f"aggregate score); name its tasks or a group in evaluate.categories"
                )
            with explained_task_errors(name):
                loaded = manager.load([name])
            for task_name, task in loaded["tasks"].items():
                if len(task.eval_docs) == 0:
                    raise TaskError(f"evaluation task {task_name!r} has no documents")
            tasks.update(loaded["tasks"])
            groups.update(loaded.get("groups", {}))
            group_map.update(loaded.get("group_map", {}))
            leaves[name] = list(loaded["tasks"])
            groups_of[name] = dict(loaded.get("groups", {}))
    return TaskSuite(
        {"tasks": tasks, "groups": groups, "group_map": group_map}, leaves, files, groups_of
    )


@contextlib.contextmanager
def explained_task_errors(name: str | None = None) -> Iterator[None]:
    """Re-raise what `explain_task_error` explains (raised while lm-eval builds or renders a task
    of `name`) as that TaskError; anything else passes through."""
    try:
        yield
    except Exception as err:
        explained = explain_task_error(err, name)
        if explained is None:
            raise
        raise explained from None


def explain_task_error(err: Exception, name: str | None = None) -> TaskError | None:
    """The one-line TaskError for an exception lm-eval raised while building or rendering a task
    (`name` is the configured name it came from), or None when it is not one of these:

    - the task's dataset is neither local nor in the datasets cache (ConnectionError offline);
    - a data file of the task is missing (FileNotFoundError while loading its dataset);
    - a template (doc_to_text, doc_to_target, doc_to_choice...) fails on a document (jinja2).
    """
    from jinja2 import TemplateError, TemplateSyntaxError

    frames = _lm_eval_frames(err)
    task = next((f["self"] for f in frames if _is_task(f.get("self"))), None)
    label = repr(task.config.task) if task is not None else repr(name)
    loading = any(f["__name__"] == "download" for f in frames)
    if isinstance(err, ConnectionError) and loading:
        dataset = task.config.dataset_path if task is not None else "its dataset"
        if task is not None and task.config.dataset_name:
            dataset = f"{dataset} ({task.config.dataset_name})"
        return TaskError(
            f"evaluation task {label}: its dataset {dataset} is not available offline (not a local "
            f"file, not in the Hugging Face datasets cache {_datasets_cache()}); {_OFFLINE_HINT}"
        )
    if isinstance(err, FileNotFoundError) and loading:
        found = re.search(r"'([^']+)'", str(err))
        missing = found.group(1) if found else str(err)
        return TaskError(
            f"evaluation task {label}: its data file {missing} does not exist; fix "
            f"dataset_kwargs.data_files in its task YAML (evaluate.include_path)"
        )
    if isinstance(err, TemplateError):
        field_frame = next((f for f in frames if f["__name__"] in _TEMPLATE_FIELDS), None)
        template = field_frame["__name__"] if field_frame is not None else "a template"
        # build_all_requests renders document doc_id; a task's __init__ renders its first one.
        doc_id = next(
            (f.get("doc_id") for f in frames if f["__name__"] == "build_all_requests"), None
        )
        if doc_id is None and any(
            f["__name__"] == "__init__" and _is_task(f.get("self")) for f in frames
        ):
            doc_id = 0
        doc = field_frame.get("doc") if field_frame is not None else None
        where = f"document {doc_id + 1}" if isinstance(doc_id, int) else "a document"
        if isinstance(err, TemplateSyntaxError):
            problem = f"is not a valid template ({err.message}, line {err.lineno})"
        else:
            problem = f"fails on {where}: {err.message}"
        fields = f" (its fields: {', '.join(map(str, doc))})" if isinstance(doc, dict) else ""
        return TaskError(
            f"evaluation task {label}: {template} {problem}{fields}; fix {template} in its task "
            f"YAML"
        )
    return None


def _lm_eval_frames(err: BaseException) -> list[dict[str, Any]]:
    """Each traceback frame's locals plus "__name__" (its function), innermost first."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append({**tb.tb_frame.f_locals, "__name__": tb.tb_frame.f_code.co_name})
        tb = tb.tb_next
    return frames[::-1]


def _is_task(value: Any) -> bool:
    from lm_eval.api.task import Task

    return isinstance(value, Task)


def _datasets_cache() -> str:
    import datasets

    return str(datasets.config.HF_DATASETS_CACHE)
