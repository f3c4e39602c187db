"""The schema of artifact manifests, checked on every read: one line naming the field at fault.

Every manifest is {"kind", "files": {path: {"size", "sha256"}}, ...fields}. The fields readers
use are typed per kind (a dataset's dtype, vocab_size, eos_token_id, datasets and token prior;
a model's tokens, seconds and norms; a checkpoint's step); fields a kind does not name are kept
as they are, so a newer writer's extra fields do not break an older reader. Values are strict:
a number is a JSON number, never a string or a boolean, and never NaN or infinite.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictInt,
    StrictStr,
    ValidationError,
)

from demix.errors import DataError

Count = Annotated[StrictInt, Field(ge=0)]


def _finite(value: Any) -> int | float:
    """A JSON number that is finite (not a boolean, a string, NaN or infinite)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("should be a finite number")
    return value


def _non_negative(value: int | float) -> int | float:
    if value < 0:
        raise ValueError("should be a number >= 0")
    return value


Real = Annotated[Any, PlainValidator(_finite)]
Amount = Annotated[Any, PlainValidator(_finite), AfterValidator(_non_negative)]
Sha256 = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
# Token stream dtypes a dataset may be stored in (curation writes uint16 or uint32)
TOKEN_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")


class _Fields(BaseModel):
    """Typed fields, others kept as they are."""

    model_config = ConfigDict(extra="allow")


class FileEntry(BaseModel):
    """One listed file: its size in bytes and its sha256 (64 lowercase hex digits)."""

    model_config = ConfigDict(extra="forbid")
    size: Count
    sha256: Sha256


class Manifest(_Fields):
    """What every manifest holds: its kind and every file of the artifact."""

    kind: StrictStr
    files: dict[str, FileEntry]


class DatasetSplits(_Fields):
    """Token counts of one dataset of a dataset artifact."""

    train_tokens: Count
    heldout_tokens: Count
    full_train_tokens: Count | None = None


class DatasetManifest(Manifest):
    """A curated dataset (demix.dataset): token streams, their dtype, and the tokenizer."""

    datasets: Annotated[dict[str, DatasetSplits], Field(min_length=1)]
    targets: dict[str, DatasetSplits] = {}
    token_prior: dict[str, Amount]
    dtype: Literal[TOKEN_DTYPES]  # type: ignore[valid-type]
    vocab_size: Annotated[StrictInt, Field(ge=1)]
    eos_token_id: Count
    tokenizer: StrictStr
    seconds: Amount = 0

    def consistency(self) -> tuple[str, str] | None:
        """(field, why) of the first value that contradicts another, or None."""
        if self.eos_token_id >= self.vocab_size:
            return "eos_token_id", f"{self.eos_token_id} is not below vocab_size {self.vocab_size}"
        if self.vocab_size - 1 > np.iinfo(np.dtype(self.dtype)).max:
            return "dtype", f"{self.dtype} cannot hold token ids below vocab_size {self.vocab_size}"
        if set(self.token_prior) != set(self.datasets):
            return "token_prior", "does not name exactly the datasets"
        overlap = sorted(set(self.targets) & set(self.datasets))
        if overlap:
            return "targets", f"{overlap[0]!r} is also a dataset"
        return None


class ModelManifest(Manifest):
    """A model (demix.model): HF files, and what trained or merged it."""

    role: StrictStr | None = None
    name: StrictStr | None = None
    fingerprint: StrictStr | None = None
    tokens: Count | None = None
    seconds: Amount | None = None
    relative_delta_norm: Amount | None = None
    component_weights: list[Real] | None = None
    weight_files: list[StrictStr] | None = None


class CheckpointManifest(Manifest):
    """A training checkpoint (demix.checkpoint): the step it was saved at."""

    step: Count


SCHEMAS: dict[str, type[Manifest]] = {
    "demix.dataset": DatasetManifest,
    "demix.model": ModelManifest,
    "demix.checkpoint": CheckpointManifest,
}


def _field(loc: tuple) -> str:
    """A pydantic error location as a dotted field path (the model name left out)."""
    parts = [str(p) for p in loc if not str(p).startswith(("function-", "constrained-"))]
    return ".".join(p for p in parts if p not in {"int", "float", "str"}) or "(manifest)"


def check_manifest_fields(manifest: dict[str, Any], where: str) -> None:
    """Check a parsed manifest against the schema of its kind (the common one for other kinds).

    Raises DataError naming `where` and the first field that has a wrong type or value.
    """
    kind = manifest.get("kind")
    schema = SCHEMAS.get(kind, Manifest) if isinstance(kind, str) else Manifest
    try:
        fields = schema.model_validate(manifest)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        got = repr(first.get("input"))
        got = got if len(got) <= 40 else got[:37] + "..."
        reason = " ".join(first["msg"].split()).removeprefix("Value error, ")
        _refuse(where, _field(first["loc"]), f"{reason} (found {got})")
    conflict = fields.consistency() if isinstance(fields, DatasetManifest) else None
    if conflict:
        _refuse(where, *conflict)


def _refuse(where: str, field: str, why: str) -> None:
    """Raise DataError: the manifest at `where` has a bad `field`."""
    raise DataError(
        f"{where}: manifest field {field!r}: {why}; the artifact was edited or is corrupt, "
        "write it again"
    ) from None
