"""Run configuration: pydantic models loaded from one YAML file per run.

Unknown keys and bad values are rejected with the dotted key path in the message. The schema is
one model per config section: `data` and `model` (demix.config.data), the stages' sections
(demix.config.sections: train, merge, evaluate, search, final, fidelity), and the whole run
with how it is read (demix.config.run). Everything is imported from `demix.config`.
"""

from demix.config.data import (
    ArchitectureConfig,
    DataConfig,
    DatasetSpec,
    ModelConfig,
    Strict,
    TokenizerConfig,
    per_dataset,
    positive,
    unknown_datasets,
)
from demix.config.run import (
    RunConfig,
    UniqueKeyLoader,
    check_rounds,
    config_yaml,
    load_config,
    load_yaml,
    parse_config,
    resolve_config,
    set_dotted,
)
from demix.config.sections import (
    MERGE_METHOD_PARAMETERS,
    TRAINING_ROLES,
    DecisionConfig,
    EvaluateConfig,
    FidelityConfig,
    FinalConfig,
    MergeConfig,
    PredictorConfig,
    SamplerConfig,
    SearchConfig,
    StageTraining,
    TrainConfig,
)
from demix.errors import ConfigError

__all__ = [
    "MERGE_METHOD_PARAMETERS",
    "ArchitectureConfig",
    "ConfigError",
    "DataConfig",
    "DatasetSpec",
    "DecisionConfig",
    "EvaluateConfig",
    "FidelityConfig",
    "FinalConfig",
    "MergeConfig",
    "ModelConfig",
    "PredictorConfig",
    "RunConfig",
    "SamplerConfig",
    "SearchConfig",
    "StageTraining",
    "TRAINING_ROLES",
    "Strict",
    "TokenizerConfig",
    "TrainConfig",
    "UniqueKeyLoader",
    "check_rounds",
    "config_yaml",
    "load_config",
    "load_yaml",
    "parse_config",
    "per_dataset",
    "positive",
    "resolve_config",
    "set_dotted",
    "unknown_datasets",
]
