"""A whole run config (`RunConfig`, the cross-section checks) and how it is read: YAML with
unique keys, `--set` overrides by dotted key, one-line errors naming the key path."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError, model_validator

from demix.config.data import DataConfig, ModelConfig, Strict, unknown_datasets
from demix.config.sections import (
    DecisionConfig,
    EvaluateConfig,
    FidelityConfig,
    FinalConfig,
    MergeConfig,
    SearchConfig,
    TrainConfig,
)
from demix.errors import ConfigError


class RunConfig(Strict):
    """One DeMix run."""

    seed: int = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig
    merge: MergeConfig = MergeConfig()
    evaluate: EvaluateConfig
    search: SearchConfig = SearchConfig()
    final: FinalConfig = FinalConfig()
    fidelity: FidelityConfig = FidelityConfig()
    decision: DecisionConfig = DecisionConfig()

    @model_validator(mode="after")
    def _cross(self) -> RunConfig:
        if self.model.base is None and self.train.base is None:
            raise ValueError(
                "train.base is required when model.base is empty (the demo pretrains a base)"
            )
        for where, merge in (
            ("merge", self.merge),
            *((f"fidelity.ablations.{i}", m) for i, m in enumerate(self.fidelity.ablations)),
        ):
            _check_mapping(where, merge, self.train.general_ratio)
        unknown = sorted(set(self.evaluate.category_weights or {}) - set(self.evaluate.categories))
        if unknown:
            raise ValueError(f"evaluate.category_weights names no category: {unknown}")
        if self.evaluate.category_weights is not None and (
            any(w < 0 for w in self.evaluate.category_weights.values())
            or sum(self.evaluate.category_weights.values()) <= 0
        ):
            raise ValueError("evaluate.category_weights must be >= 0 with a positive sum")
        unknown_datasets(self.search.max_epochs, "search.max_epochs", self.data.names)
        names = {*self.data.names, *self.data.target_names}
        where = {f"categories.{c}": tasks for c, tasks in self.evaluate.categories.items()}
        for place, tasks in {**where, "diagnostics": self.evaluate.diagnostics}.items():
            for task in tasks:
                if task.startswith("heldout:") and task.split(":", 1)[1] not in names:
                    raise ValueError(
                        f"evaluate.{place}: {task!r} names no dataset or target; "
                        f"known: {sorted(names)}"
                    )
        return self


def _check_mapping(where: str, merge: MergeConfig, general_ratio: float) -> None:
    if merge.method in ("ties", "dare_ties") and merge.weights == "data" and general_ratio > 0:
        raise ValueError(
            f"{where}.method {merge.method!r} averages with non-negative component weights, "
            f"but weights: data maps mixtures to component weights that can be negative "
            f"when train.general_ratio > 0; set {where}.weights: hull or component, or use "
            f"linear, task_arithmetic or dare_linear"
        )


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "<top level>"
    if not where.isprintable():  # a key with a line break or control character
        where = repr(where)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling against the config reference in README.md)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "less_than_equal":  # an upper bound of demix.config.bounds
        msg = (
            f"{first['input']} is above the limit {first['ctx']['le']} (what one machine or "
            "pipeline can hold; see Limits in docs/configuration.md)"
        )
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def parse_config(raw: object, source: str = "<config>") -> RunConfig:
    """Validate a parsed YAML/dict config.

    Raises ConfigError naming the key path of the first problem.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path, overrides: dict[str, object] | None = None) -> RunConfig:
    """Load and validate a run config from YAML, with optional dotted-key overrides.

    Raises ConfigError when the file is missing, is not YAML, or fails validation.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror})") from None
    try:  # YAML may be UTF-16 with a byte order mark; anything else is UTF-8
        text = raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}); save it as UTF-8"
        ) from None
    return resolve_config(text, overrides, str(path))


def set_dotted(raw: dict, key: str, value: object) -> None:
    """Set raw["a"]["b"] = value for key "a.b", creating mappings on the way.

    Raises ConfigError when a part of the path is not a mapping.
    """
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part!r} is not a mapping in the config")
    node[parts[-1]] = value


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML keeps the last)."""

    source = "<yaml>"

    def get_single_data(self):
        """The document's data; ConfigError at a key given twice or a recursive alias."""
        node = self.get_single_node()
        if node is None:
            return None
        self._check_keys(node, "", set(), ())
        return self.construct_document(node)

    def _check_keys(
        self, node: yaml.Node, path: str, seen: set[int], ancestors: tuple[int, ...]
    ) -> None:
        """Raise ConfigError at the first key given twice in a mapping under `node`, or at an
        alias that contains itself."""
        if id(node) in ancestors:
            raise ConfigError(
                f"{self.source}:{node.start_mark.line + 1}: {path or 'the document'}: an alias "
                "refers to a value that contains it; write the value out"
            )
        if id(node) in seen:  # an alias of a node checked already
            return
        seen.add(id(node))
        inner = (*ancestors, id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, f"{path}.{i}" if path else str(i), seen, inner)
        elif isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                dotted = f"{path}.{name}" if path else str(name)
                if name is not None and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, name) in lines:
                        raise ConfigError(
                            f"{self.source}:{key.start_mark.line + 1}: duplicate key {dotted} "
                            f"(first given at line {lines[key.tag, name]}); keep one of them"
                        )
                    lines[key.tag, name] = key.start_mark.line + 1
                self._check_keys(value, dotted, seen, inner)


def load_yaml(text: str, source: str = "<yaml>") -> object:
    """Parse YAML text with the safe loader, refusing keys given twice.

    Raises ConfigError naming `source` and the line of invalid YAML or of a duplicate key.
    """
    loader = None
    try:
        loader = UniqueKeyLoader(text)  # reads the text: refuses unprintable characters
        loader.source = source
        return loader.get_single_data()
    except yaml.reader.ReaderError as err:
        raise ConfigError(
            f"{source}: not valid YAML (character #x{err.character:04x} at offset "
            f"{err.position} is not allowed)"
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{source}:{mark.line + 1}" if mark and "\n" in text.strip() else source
        problem = " ".join(str(err.problem or err.context or "").split())
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML (nested too deeply)") from None
    except (ValueError, OverflowError) as err:  # a timestamp that is no date, e.g. 2024-13-45
        raise ConfigError(f"{source}: not valid YAML ({' '.join(str(err).split())})") from None
    finally:
        if loader is not None:
            loader.dispose()


def resolve_config(
    config_yaml: str,
    overrides: dict[str, object] | None = None,
    source: str = "config_yaml",
    compiled_rounds: int | None = None,
) -> RunConfig:
    """Parse config YAML text, apply dotted-key overrides (None values are skipped), validate.

    `compiled_rounds`: the search rounds a pipeline was compiled with, which search.rounds must
    equal. Raises ConfigError naming the key path (or line) of the first problem.
    """
    raw = load_yaml(config_yaml, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(raw, key, value)
    config = parse_config(raw, source)
    if compiled_rounds is not None:
        check_rounds(config, compiled_rounds, source)
    return config


def check_rounds(config: RunConfig, compiled_rounds: int, source: str) -> None:
    """Refuse a config whose search.rounds differs from a compiled pipeline's unrolled rounds.

    Raises ConfigError naming both numbers.
    """
    if config.search.rounds != compiled_rounds:
        raise ConfigError(
            f"{source}: search.rounds is {config.search.rounds} but the pipeline was compiled "
            f"with {compiled_rounds} search rounds; recompile with `pipeline.py compile --config "
            f"CONFIG` (rounds from the config) or set search.rounds: {compiled_rounds}"
        )


def config_yaml(config: RunConfig) -> str:
    """A config as YAML text (what pipeline components receive)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
