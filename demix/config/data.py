"""The run config's ground: the per-dataset setting helpers, the strict base model, and the
`data` and `model` sections (datasets, tokenizer, architecture, base)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import demix.config.bounds as bounds
from demix.errors import ConfigError


def per_dataset(setting, name: str):
    """A setting given as one value for every dataset or as {dataset: value}: `name`'s value
    (None: unset for it)."""
    return setting.get(name) if isinstance(setting, dict) else setting


def positive(setting):
    """A per-dataset setting (one number or {dataset: number}, or None), checked to be > 0.

    Raises ValueError for a number that is not (NaN included).
    """
    values = setting.values() if isinstance(setting, dict) else [setting]
    if setting is not None and not all(v > 0 for v in values):
        raise ValueError("must be > 0 (one number, or {dataset: number})")
    return setting


def at_most(setting, bound: int):
    """A per-dataset setting (one number or {dataset: number}, or None), checked to be at most
    `bound` (demix.config.bounds).

    Raises ValueError for a number above it.
    """
    values = setting.values() if isinstance(setting, dict) else [setting]
    if setting is not None and any(v > bound for v in values):
        raise ValueError(f"must be at most {bound} (one number, or {{dataset: number}})")
    return setting


def unknown_datasets(setting, key: str, names: list[str]) -> None:
    """Refuse a per-dataset mapping that names no candidate dataset.

    Raises ValueError naming the dotted key and the known datasets.
    """
    unknown = sorted(set(setting) - set(names)) if isinstance(setting, dict) else []
    if unknown:
        raise ValueError(f"{key}.{unknown[0]}: not one of the datasets {names}")


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(Strict):
    """One named candidate dataset: files or folders of .jsonl (optionally .gz or .zst),
    .txt(.gz) or Parquet, or a folder saved by `datasets` (save_to_disk). `text_field` names the
    JSON field or the Parquet/Arrow column holding each document's text.

    `where` keeps only the records whose fields match: {field: [glob, ...]} (fnmatch patterns,
    case-sensitive; a record is kept when, for every field, its string value matches one of the
    field's patterns; a record without the field, or with a value that is not a string, is
    left out). One corpus can so be split into several candidates by its metadata, e.g.
    `{source: ["math/geometry/*"]}`. Records only (JSONL, Parquet, Arrow), not text files.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    paths: list[str] = Field(min_length=1)
    text_field: str = "text"
    where: dict[str, list[str]] = Field(default_factory=dict)

    @field_validator("where", mode="before")
    @classmethod
    def _patterns(cls, value):
        if not isinstance(value, dict):
            return value
        out = {}
        for field, patterns in value.items():
            patterns = [patterns] if isinstance(patterns, str) else patterns
            if not field or not patterns:
                raise ValueError(f"where: field {field!r} needs at least one pattern")
            out[field] = patterns
        return out


class TokenizerConfig(Strict):
    """Byte-level BPE trained on a sample of the candidate datasets when no base model is given.

    The sample holds about `sample_chars` characters (see demix.data.curate.tokenizer_sample).
    """

    vocab_size: int = Field(default=4096, ge=256, le=65536)
    sample_chars: int = Field(default=100_000_000, ge=1, le=bounds.MAX_TOKENIZER_SAMPLE_CHARS)


class DataConfig(Strict):
    """Candidate datasets and curation settings.

    `general` names the dataset mixed into every component (none: the token-prior mixture of
    all datasets). `targets` are datasets the trained models should be good at but are never
    trained on: curated like the candidates (same cleaning and tokenizer, and deduplicated
    against them, so no target document is also a training document), every document held out,
    so `heldout:<target>` can be an evaluation task (say, "which sources make my model good at
    our support tickets"). `fetch_demo` is a folder to fetch the embedded demo corpus into first.
    `curate_groups` is how many groups of input files curation fans out over (at most one per
    file); the curated result does not depend on it. `max_tokens` (one number, or per dataset)
    curates about that many tokens of a larger dataset, a sample of its documents chosen by
    content hash, and estimates its token prior from the sample (demix.data.curate).
    Each candidate holds out heldout_fraction of its documents, at least
    `min_heldout_documents` (so a dataset of few long documents is still evaluated on enough
    of them) and at most `max_heldout_documents`, never all of them.
    `max_document_bytes` bounds one document as read (a JSONL line, a text file, a Parquet or
    Arrow value; decompressed bytes): files are read in bounded pieces, so a longer document is
    never held whole. `oversize` says what happens to one: `refuse` (the default: one line
    naming the file and line), `skip` (left out), or `truncate` (its first max_document_bytes
    bytes kept, cut at a character; a JSONL record cannot be parsed without holding it whole
    and is skipped instead). Skipped and truncated documents are counted per dataset in the
    curation log and the dataset manifest (`oversize_skipped`, `oversize_truncated`).
    """

    datasets: list[DatasetSpec] = Field(min_length=2)
    targets: list[DatasetSpec] = Field(default_factory=list)
    general: str | None = None
    fetch_demo: str | None = None
    min_chars: int = Field(default=64, ge=1)
    heldout_fraction: float = Field(default=0.02, gt=0, lt=0.5)
    min_heldout_documents: int = Field(default=1, ge=1, le=bounds.MAX_EVAL_DOCUMENTS)
    max_heldout_documents: int = Field(default=200, ge=1, le=bounds.MAX_EVAL_DOCUMENTS)
    curate_groups: int = Field(default=8, ge=1, le=bounds.MAX_CURATE_GROUPS)
    max_tokens: int | dict[str, int] | None = None
    max_document_bytes: int = Field(
        default=bounds.DEFAULT_MAX_DOCUMENT_BYTES,
        ge=bounds.MIN_DOCUMENT_BYTES,
        le=bounds.MAX_DOCUMENT_BYTES,
    )
    oversize: Literal["refuse", "skip", "truncate"] = "refuse"
    tokenizer: TokenizerConfig = TokenizerConfig()

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, value):
        return at_most(positive(value), bounds.MAX_TRAINING_TOKENS)

    @model_validator(mode="after")
    def _names(self) -> DataConfig:
        names = [d.name for d in self.datasets]
        every = names + [t.name for t in self.targets]
        dup = sorted({n for n in every if every.count(n) > 1})
        if dup:
            raise ValueError(
                f"duplicate dataset names {dup} (data.datasets and data.targets share one "
                "namespace); give each dataset a unique name"
            )
        if self.min_heldout_documents > self.max_heldout_documents:
            raise ValueError(
                f"min_heldout_documents={self.min_heldout_documents} exceeds "
                f"max_heldout_documents={self.max_heldout_documents}"
            )
        if self.general is not None and self.general not in names:
            raise ValueError(f"general={self.general!r} is not one of the datasets {names}")
        unknown_datasets(self.max_tokens, "max_tokens", names)
        return self

    @property
    def names(self) -> list[str]:
        """The candidate datasets (the mixture's coordinates), in config order."""
        return [d.name for d in self.datasets]

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def all_specs(self) -> list[DatasetSpec]:
        """Candidates then targets: the order curation reads them in (a target document that
        repeats a candidate's is dropped from the target)."""
        return [*self.datasets, *self.targets]


class ArchitectureConfig(Strict):
    """A tiny Llama built from config when no base model is given (demo and tests)."""

    hidden_size: int = Field(default=128, ge=8, le=bounds.MAX_HIDDEN_SIZE)
    num_layers: int = Field(default=2, ge=1, le=bounds.MAX_LAYERS)
    num_heads: int = Field(default=4, ge=1, le=bounds.MAX_HEADS)
    intermediate_size: int = Field(default=384, ge=8, le=bounds.MAX_INTERMEDIATE_SIZE)
    max_position_embeddings: int = Field(default=256, ge=16, le=bounds.MAX_POSITIONS)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads(self) -> ArchitectureConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        return self


class ModelConfig(Strict):
    """Base model: an HF causal-LM folder (safetensors) given as a local folder, a gs:// URI or
    a hub id ORG/NAME[@REVISION] (demix.base_model), or None to pretrain a tiny one."""

    base: str | None = None
    architecture: ArchitectureConfig = ArchitectureConfig()
    trust_remote_code: bool = False
    attn_implementation: str | None = "eager"

    @field_validator("base")
    @classmethod
    def _base_form(cls, value: str | None) -> str | None:
        from demix.base_hub import base_form

        if value is not None:
            try:
                base_form(value)
            except ConfigError as err:
                raise ValueError(str(err).removeprefix("model.base ")) from None
        return value

    @property
    def base_form(self) -> str | None:
        """'local', 'gcs' or 'hub' (demix.base_hub.base_form); None without a base."""
        from demix.base_hub import base_form

        return base_form(self.base) if self.base is not None else None
