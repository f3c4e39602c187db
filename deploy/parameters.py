"""What `submit` and `schedule` send: pipeline parameters checked against the compiled package,
and the run settings (labels, cron, start time) checked before any client is created; and what
a compiled package records (its rounds, multi-node job, default root and name).

Every function raises ConfigError with a one-line message naming the flag and the value.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

from demix.errors import ConfigError

# Pipeline parameters the CLI computes from --config: never given with --param.
FROM_CONFIG = {"config_yaml": "the text of a local --config", "config_uri": "a gs:// --config"}

_TYPE_WORDS = {
    "STRING": "a string",
    "NUMBER_INTEGER": "an integer",
    "NUMBER_DOUBLE": "a number",
    "BOOLEAN": "true or false",
    "LIST": "a JSON list",
    "STRUCT": "a JSON object",
}


def package_documents(package: str | Path) -> list[dict]:
    """The YAML documents of a compiled package: the pipeline spec, then for Kubeflow the
    platform settings."""
    import yaml

    return [d for d in yaml.safe_load_all(Path(package).read_text()) if d]


def package_spec(package: str | Path) -> dict:
    """The pipeline spec of a compiled package (its first YAML document)."""
    return (package_documents(package) or [{}])[0]


def package_parameters(package: str | Path) -> dict[str, str]:
    """The root input parameters of a compiled package: {name: parameterType}."""
    parameters = package_spec(package).get("root", {}).get("inputDefinitions", {})
    return {k: v["parameterType"] for k, v in parameters.get("parameters", {}).items()}


def compiled_rounds(package: str | Path) -> int | None:
    """The search rounds unrolled into a compiled pipeline package (None when it records none)."""
    tasks = package_spec(package).get("root", {}).get("dag", {}).get("tasks", {})
    value = (
        tasks.get("resolve-config", {})
        .get("inputs", {})
        .get("parameters", {})
        .get("compiled_rounds", {})
        .get("runtimeValue", {})
        .get("constant")
    )
    return None if value is None else int(value)


def compiled_job(package: str | Path) -> dict | None:
    """The settings of the multi-node training job compiled into a package (None: training
    runs in the pipeline's own tasks)."""
    from demix.distributed import job_settings

    spec = package_spec(package)
    # the base's training task, wherever the pipeline's sub-graphs put it
    dags = [spec.get("root", {}), *spec.get("components", {}).values()]
    tasks = [d.get("dag", {}).get("tasks", {}).get("train-model") for d in dags]
    clusters = [
        task.get("inputs", {})
        .get("parameters", {})
        .get("cluster", {})
        .get("runtimeValue", {})
        .get("constant")
        for task in tasks
        if task
    ]
    cluster = next((c for c in clusters if c), None)
    return job_settings(cluster) if cluster else None


def package_root(package: str | Path) -> str | None:
    """The default pipeline root compiled into a package (`compile --pipeline-root`), or None."""
    return package_spec(package).get("defaultPipelineRoot")


def package_name(package: str | Path) -> str:
    """The pipeline's name in a compiled package (pipelineInfo.name)."""
    return package_spec(package).get("pipelineInfo", {}).get("name", "demix")


def parse_params(pairs: list[str], types: dict[str, str]) -> dict:
    """`--param NAME=VALUE` pairs as {name: value of the parameter's declared type}.

    Refuses a pair without '=', a name the package does not declare, a parameter computed
    from --config, a name given twice, and a value that is not of the declared type.
    """
    values: dict = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise ConfigError(f"--param {pair}: expected NAME=VALUE")
        if name not in types:
            raise ConfigError(
                f"--param {pair}: the pipeline has no parameter {name!r}; "
                f"its parameters: {', '.join(sorted(types))}"
            )
        if name in FROM_CONFIG:
            raise ConfigError(f"--param {pair}: {name} is {FROM_CONFIG[name]}; set --config")
        if name in values:
            raise ConfigError(f"--param {pair}: {name} is given twice")
        values[name] = _convert(pair, name, text, types[name])
    return values


def _convert(pair: str, name: str, text: str, kind: str):
    def bad():
        return ConfigError(f"--param {pair}: {name} takes {_TYPE_WORDS.get(kind, kind)}")

    if kind == "STRING":
        return text
    if kind == "NUMBER_INTEGER":
        try:
            return int(text)
        except ValueError:
            raise bad() from None
    if kind == "NUMBER_DOUBLE":
        try:
            value = float(text)
        except ValueError:
            raise bad() from None
        if not math.isfinite(value):
            raise bad()
        return value
    if kind == "BOOLEAN":
        if text.lower() not in ("true", "false"):
            raise bad()
        return text.lower() == "true"
    if kind in ("LIST", "STRUCT"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise bad() from None
        if not isinstance(value, list if kind == "LIST" else dict):
            raise bad()
        return value
    raise bad()


# Vertex AI label keys and values: lowercase letters, digits, '_' and '-', at most 63
# characters; keys start with a letter.
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")


def parse_labels(text: str | None) -> dict[str, str]:
    """`--labels k=v,k2=v2` as a dict ({} for none)."""
    labels: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
            raise ConfigError(
                f"--labels {text}: {item!r} is not KEY=VALUE of lowercase letters, digits, "
                "'_' and '-' (a key starts with a letter; at most 63 characters each)"
            )
        if key in labels:
            raise ConfigError(f"--labels {text}: {key} is given twice")
        labels[key] = value
    return labels


def parse_start_time(text: str | None) -> str | None:
    """`--start-time`, ISO 8601 with a UTC offset, as RFC 3339 in UTC (what both backends take)."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ConfigError(
            f"--start-time {text}: expected an ISO 8601 time with a UTC offset, "
            "e.g. 2030-01-31T02:00:00Z or 2030-01-31T03:00:00+01:00"
        )
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_cron(expr: str, vertex: bool) -> str:
    """`--cron`: five fields (minute hour day-of-month month day-of-week) on both backends.

    Vertex AI takes them as they are, after an optional `TZ=Area/City` or `CRON_TZ=...`;
    Kubeflow's scheduler reads six fields, seconds first, so it gets `0 ` in front (six
    fields given for Kubeflow are passed as they are).
    """
    fields = expr.split()
    zone = fields[:1] if fields and fields[0].startswith(("TZ=", "CRON_TZ=")) else []
    count = len(fields) - len(zone)
    if vertex and count == 5:
        return " ".join(fields)
    if not vertex and not zone and count in (5, 6):
        return " ".join(["0", *fields] if count == 5 else fields)
    expected = (
        "five fields, optionally after TZ=Area/City"
        if vertex
        else "five fields (or six, seconds first)"
    )
    raise ConfigError(f"--cron {expr!r}: expected {expected}, e.g. '0 3 * * 1'")


def run_parameters(args) -> dict:
    """The run's parameter values: the config (its text, or its gs:// URI as config_uri),
    --eval-workers and each --param, converted to the package's declared types.

    Raises ConfigError for a bad --param, or when the config's search.rounds differs from the
    rounds compiled into the package.
    """
    from demix.cli_outputs import parse_overrides
    from demix.config import check_rounds, config_yaml, resolve_config
    from demix.run_inputs import read_config_text
    from demix.storage import is_remote

    values = parse_params(args.param, package_parameters(args.package))
    if args.eval_workers is not None:
        if "num_eval_workers" in values:
            raise ConfigError("--eval-workers and --param num_eval_workers: give one of them")
        values["num_eval_workers"] = args.eval_workers
    if bool(args.config) == bool(args.config_flag):
        raise ConfigError(f"{args.command} needs the run config: give CONFIG (or --config) once")
    source = args.config or args.config_flag
    remote = is_remote(source)
    if remote and args.set:
        raise ConfigError(
            f"--set applies to a local config; {source} is read by the run itself: edit it "
            "there, or copy it here and give the copy"
        )
    if not remote and not Path(source).is_file():
        raise ConfigError(f"{source}: no such config file")
    text = read_config_text("", source) if remote else Path(source).read_text()
    config = resolve_config(text, parse_overrides(args.set), source=str(source))
    if args.set:
        text = config_yaml(config)
    rounds = compiled_rounds(args.package)
    if rounds is not None:
        check_rounds(config, rounds, str(source))
    given = {"config_uri": source} if remote else {"config_yaml": text}
    return {**given, **values}
