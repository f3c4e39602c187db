"""The lm-eval task suite of a run: bundled offline demo tasks plus any lm-eval task name.

The bundled task YAMLs in `tasks/` are templates (their data files are only known at run time):
they are rendered for one eval data folder into a private include folder and loaded from there
with `TaskManager(include_defaults=False)`, which indexes in milliseconds instead of the ~11 s
lm-eval spends indexing its built-in tasks. Built-in tasks are indexed only when the config names
one. Precedence for a name: the config's include_path, then the bundled tasks, then lm-eval's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: not valid JSON ({err.msg}); {_FETCH_HINT}") from None
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


def load_task_suite(
    names: list[str],
    workdir: Path,
    eval_data_dir: Path | None = None,
    include_path: str | None = None,
) -> TaskSuite:
    """Build the lm-eval tasks for `names` once (bundled ones read from eval_data_dir).

    Raises TaskError for unknown names, tags, a missing eval_data_dir or eval file, and tasks
    without documents.
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
        builtin = TaskManager(include_defaults=True)
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
