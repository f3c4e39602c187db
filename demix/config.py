"""Run configuration: pydantic models loaded from one YAML file per run.

Unknown keys and bad values are rejected with the dotted key path in the message. (Over 400
lines as one coherent thing: the whole schema of a run, one model per config section.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from demix.errors import ConfigError
from demix.merge.methods import METHODS, method_parameters


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
    sample_chars: int = Field(default=100_000_000, ge=1)


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
    """

    datasets: list[DatasetSpec] = Field(min_length=2)
    targets: list[DatasetSpec] = Field(default_factory=list)
    general: str | None = None
    fetch_demo: str | None = None
    min_chars: int = Field(default=64, ge=1)
    heldout_fraction: float = Field(default=0.02, gt=0, lt=0.5)
    min_heldout_documents: int = Field(default=1, ge=1)
    max_heldout_documents: int = Field(default=200, ge=1)
    curate_groups: int = Field(default=8, ge=1)
    max_tokens: int | dict[str, int] | None = None
    tokenizer: TokenizerConfig = TokenizerConfig()

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, value):
        return positive(value)

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

    hidden_size: int = Field(default=128, ge=8)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=4, ge=1)
    intermediate_size: int = Field(default=384, ge=8)
    max_position_embeddings: int = Field(default=256, ge=16)
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
        from demix.base_model import base_form

        if value is not None:
            try:
                base_form(value)
            except ConfigError as err:
                raise ValueError(str(err).removeprefix("model.base ")) from None
        return value

    @property
    def base_form(self) -> str | None:
        """'local', 'gcs' or 'hub' (demix.base_model.base_form); None without a base."""
        from demix.base_model import base_form

        return base_form(self.base) if self.base is not None else None


class StageTraining(Strict):
    """Token budget and optimizer schedule of one training role.

    `schedule: cosine` (the default): linear warmup over `warmup_fraction` of the steps to the
    peak `lr`, then cosine decay to `min_lr_ratio` x lr; for the roles that train from the
    base (component, reference, control, final) this is the decay branch. `schedule: wsd`
    (the base only): warmup, then the lr stays at its peak (warmup-stable); the base written is
    the stable checkpoint, saved with its AdamW state: the branch point every other role decays
    from (demix.train.roles, "Branch regime" in docs). `decay_tokens` (a wsd base only): also
    write a finished copy of the base, `<base>-decayed`, the stable checkpoint decayed to
    min_lr_ratio x lr over that many tokens of the same mixture with its optimizer state
    carried; nothing branches from it. `optimizer` (the branch roles): `fresh` AdamW state, or
    `carried` from the branch point (a base trained by demix with schedule wsd; a user's
    `model.base` carries none).
    """

    tokens: int = Field(gt=0)
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_tokens: int | None = Field(default=None, gt=0)
    optimizer: Literal["fresh", "carried"] = "fresh"

    @model_validator(mode="after")
    def _decay_copy(self) -> StageTraining:
        if self.decay_tokens is not None and self.schedule != "wsd":
            raise ValueError("decay_tokens decays a warmup-stable base: set schedule: wsd")
        return self

    def changed_settings(self) -> dict:
        """The settings as a job's fingerprint reads them: those added after the first release
        only when they differ from their defaults (jobs trained before them stay valid), and
        never decay_tokens (it makes another model, not this one)."""
        defaults = {"schedule": "cosine", "optimizer": "fresh"}
        out = self.model_dump(exclude={"decay_tokens"})
        return {k: v for k, v in out.items() if k not in defaults or v != defaults[k]}


class TrainConfig(Strict):
    """The one training loop's settings, shared by every role, plus per-role budgets.

    `batch_size` rows of `seq_len` tokens is the GLOBAL batch of one optimizer step, whatever the
    number of processes. Each process runs forward passes of `micro_batch_size` rows (default:
    its whole share, batch_size / processes) and accumulates batch_size / (processes x
    micro_batch_size) of them per step. `fsdp` shards parameters, gradients and optimizer state
    across GPU processes (for models that do not fit one GPU); otherwise processes run DDP.
    """

    seq_len: int = Field(default=128, ge=8)
    batch_size: int = Field(default=16, ge=1)
    micro_batch_size: int | None = Field(default=None, ge=1)
    fsdp: bool = False
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    checkpoint_every: int = Field(default=200, ge=1)
    log_every: int = Field(default=20, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    general_ratio: float = Field(default=0.5, ge=0, lt=1)
    base: StageTraining | None = None
    component: StageTraining
    final: StageTraining

    @model_validator(mode="after")
    def _branch_regime(self) -> TrainConfig:
        if self.base is not None and self.base.optimizer == "carried":
            raise ValueError("base.optimizer: carried: the base trains from scratch; use fresh")
        for role in ("component", "final"):
            stage = getattr(self, role)
            if stage.schedule == "wsd":
                raise ValueError(
                    f"{role}.schedule: wsd: only the base stays at its peak lr (the branch "
                    f"point); {role} models are decay branches from it: use cosine"
                )
        return self

    @model_validator(mode="after")
    def _micro_batch(self) -> TrainConfig:
        micro = self.micro_batch_size
        if micro is not None and (micro > self.batch_size or self.batch_size % micro):
            raise ValueError(
                f"micro_batch_size={micro} does not divide batch_size={self.batch_size}; "
                "choose a divisor (rows per process per forward pass)"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all processes (the global batch)."""
        return self.seq_len * self.batch_size

    def accumulation(self, processes: int) -> tuple[int, int]:
        """(rows per forward pass, forward passes per step) of each of `processes` processes.

        Raises ConfigError when the global batch does not split evenly.
        """
        micro = self.micro_batch_size
        if micro is None:
            if self.batch_size % processes:
                raise ConfigError(
                    f"train.batch_size={self.batch_size} does not split over {processes} "
                    f"processes; make it a multiple of {processes}"
                )
            return self.batch_size // processes, 1
        if self.batch_size % (processes * micro):
            raise ConfigError(
                f"train.batch_size={self.batch_size} is not a multiple of {processes} processes x "
                f"train.micro_batch_size={micro}; change either, or the number of processes"
            )
        return micro, self.batch_size // (processes * micro)


# The parameters each merge method takes (demix.merge.methods; a test keeps the two in step).
# The parameters each merge method takes, from the method registry (the one source).
MERGE_METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    name: method_parameters(name) for name in METHODS
}


class MergeConfig(Strict):
    """How a mixture becomes a proxy model.

    `weights: component` (the default) uses the data mixture d as the component weights c, as
    the method's original code does; `data` maps d to c = M^-1 d (what each component was
    trained on). Under `data` a mixture with less general data than train.general_ratio gets
    some c < 0: its proxy extrapolates beyond the trained components. The default is the mapping
    that ranked the references best on `make reproduce` (macro per-category rho, component
    minus data, +0.35 with a 95% interval of [+0.06, +0.52], seed 0; README "Fidelity").
    `hull` merges with c = M^-1 d too, but searches
    (for either search.method) only mixtures with every c >= 0, sampled as d = M c with c drawn
    by the search sampler, so each proxy is a convex combination of trained models; the final
    baselines are trained and judged wherever they lie. Projecting outside mixtures onto the
    hull (non-negative least squares) instead would score the proxy of one mixture under the
    label of another, and the predictor would learn from mislabelled points. Method parameters
    left empty take the method's default (scale 1, density 0.2, drop_rate 0.5, seed 0); setting
    one the method does not take is an error. `delta_dtype: bfloat16` halves the memory of the
    search's in-memory deltas. `delta_device` says where the search keeps the base and the
    deltas: `device` beside the proxy (each proxy built at device memory bandwidth), `host` in
    (pinned) host memory, streamed to the device for each proxy, `auto` the device when the
    memory plan fits there, else the host (demix.merge.plan; it does not change scores).
    `output_dtype` and `shard_bytes` are the dtype and the largest
    safetensors shard of a merged model written to disk (`demix merge`, the pipeline's merge
    step); `auto` keeps each tensor's dtype in the base. Neither changes search scores.
    """

    method: str = "linear"  # a name of demix.merge.methods.METHODS
    weights: Literal["data", "component", "hull"] = "component"
    scale: float | None = Field(default=None, allow_inf_nan=False)
    density: float | None = Field(default=None, gt=0, le=1)
    drop_rate: float | None = Field(default=None, ge=0, lt=1)
    seed: int | None = None
    delta_dtype: Literal["float32", "bfloat16"] = "float32"
    delta_device: Literal["auto", "device", "host"] = "auto"
    output_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    shard_bytes: int = Field(default=2 * 1024**3, gt=0)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown merge method {value!r}; known: {sorted(METHODS)}")
        return value

    @model_validator(mode="after")
    def _parameters_of_method(self) -> MergeConfig:
        takes = MERGE_METHOD_PARAMETERS[self.method]
        for key in sorted(set().union(*MERGE_METHOD_PARAMETERS.values())):
            if getattr(self, key) is not None and key not in takes:
                raise ValueError(
                    f"merge.{key} does not apply to method {self.method!r} "
                    f"(it takes {list(takes) or 'no parameters'}); remove it or change merge.method"
                )
        return self

    @property
    def parameters(self) -> dict[str, float | int]:
        """The method parameters that are set (the method's defaults fill the rest)."""
        return {
            k: getattr(self, k)
            for k in MERGE_METHOD_PARAMETERS[self.method]
            if getattr(self, k) is not None
        }


class EvaluateConfig(Strict):
    """Benchmarks grouped in categories.

    A task is a bundled demo task, any lm-eval task name, or `heldout:<dataset>` (mean token
    loss on that dataset's held-out split). `data_dir` holds the bundled tasks' jsonl files.
    `engine` scores log-likelihood tasks: `fast` (requests built once, packed batches, the same
    numbers) or `lm-eval` (its own evaluate per model); generation tasks always run in lm-eval.
    `batch_size`: rows per forward pass, or `auto` (from the device's free memory and the
    model's shape; demix.evaluate.batch). `dtype`: what models are evaluated (and proxies
    merged) in; `auto` is bfloat16 on CUDA and float32 on CPU. `diagnostics`: tasks evaluated
    and reported beside the categories but in no objective, e.g. the held-out loss on a
    candidate's own domain, which ranks mixtures by that candidate's weight alone (no proxy can
    beat that trivial rule, so it belongs beside the objective, not in it).
    """

    categories: dict[str, list[str]] = Field(min_length=1)
    diagnostics: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=100, ge=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int | None = None
    heldout_tokens: int = Field(default=16384, ge=1)
    include_path: str | None = None
    data_dir: str | None = None
    engine: Literal["lm-eval", "fast"] = "fast"
    # weight of each category in the search objective and the final verdict (default: equal)
    category_weights: dict[str, float] | None = None

    @field_validator("categories")
    @classmethod
    def _nonempty(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for category, tasks in value.items():
            if not tasks:
                raise ValueError(f"category {category!r} has no tasks")
        return value

    @property
    def tasks(self) -> list[str]:
        """Every task evaluated: the categories' in order, then the diagnostics."""
        seen: dict[str, None] = {}
        for tasks in [*self.categories.values(), self.diagnostics]:
            for task in tasks:
                seen.setdefault(task, None)
        return list(seen)

    @property
    def diagnostic_tasks(self) -> list[str]:
        """The diagnostics that are in no category (a task in both counts in the objective)."""
        scored = {t for tasks in self.categories.values() for t in tasks}
        return [t for t in dict.fromkeys(self.diagnostics) if t not in scored]


class SamplerConfig(Strict):
    """Dirichlet(s * q) sampler, q = p^power / sum(p^power), as in the authors' sample.py."""

    power: float = Field(default=0.7, gt=0)
    scale_min: float = Field(default=0.5, gt=0)
    scale_max: float = Field(default=5.0, gt=0)
    num_scales: int = Field(default=15, ge=1)
    cap_factor: float = Field(default=4.0, gt=0)
    min_weight: float = Field(default=2e-4, ge=0)
    grid: float = Field(default=2e-4, gt=0, lt=1)


class PredictorConfig(Strict):
    """The regressor mixture -> search target: `kind` lightgbm (the paper's), ridge (the authors'
    fallback for few points) or auto (per fit, the one with the higher cross-validated
    Spearman; the report says which and why)."""

    kind: Literal["lightgbm", "ridge", "auto"] = "lightgbm"
    ridge_alpha: float = Field(default=1.0, gt=0)

    num_iterations: int = Field(default=300, ge=1)
    learning_rate: float = Field(default=0.01, gt=0)
    num_leaves: int = Field(default=31, ge=2)
    min_child_samples: int = Field(default=5, ge=1)


class SearchConfig(Strict):
    """Rounds of N, N/2, N/4, ... proxies; final mixture = mean of the top-k predictions.

    Rounds after the first draw their proposals at random (seeded) from the top-k predictions
    of a fresh pool of `candidates` sampled mixtures.

    `method: merge` builds each proxy by merging the components (DeMix); `trained` trains a
    proxy model per mixture from the base with the component budget (the training-based
    baseline, RegMix-style), with the same sampler, predictor, rounds and selection.

    `max_epochs` (one number, or per dataset) caps each dataset's weight in every searched
    mixture at max_epochs x its train tokens / train.final.tokens, under the sampler's own cap.
    """

    method: Literal["merge", "trained"] = "merge"
    # what the predictor learns and the search maximises (demix.search.objective)
    objective: Literal["ranking", "normalized"] = "ranking"
    n: int = Field(default=8, ge=4)
    rounds: int = Field(default=3, ge=1)
    # the authors' pool and final top (train_predictor.py); top_k is also the predicted top an
    # intermediate round draws its proposals from
    candidates: int = Field(default=200_000, ge=100)
    top_k: int = Field(default=1280, ge=1)
    max_epochs: float | dict[str, float] | None = None
    sampler: SamplerConfig = SamplerConfig()
    predictor: PredictorConfig = PredictorConfig()

    @field_validator("max_epochs")
    @classmethod
    def _positive(cls, value):
        return positive(value)

    @property
    def round_sizes(self) -> list[int]:
        return [max(1, self.n >> r) for r in range(self.rounds)]


class FinalConfig(Strict):
    """The final models: each mixture (chosen, uniform, token prior) is trained with `seeds`
    training seeds (run seed, run seed + 1, ...), and the verdict pairs them seed by seed."""

    seeds: int = Field(default=1, ge=1)


class FidelityConfig(Strict):
    """`demix validate`: R sampled reference mixtures plus the vertices and the uniform mixture,
    each trained from the base with the component budget and compared with its merged proxy.

    `replicates`: the first k references are trained again with the next training seed (run
    seed + 1) on the same mixture: their test-retest rank agreement is the reliability ceiling
    of every predictor of these references (demix.fidelity.reliability). Used by `demix
    reproduce` only: `sweep` lists component budgets and learning rates to retrain the components
    with, measuring fidelity against the same references as the updates grow; `budgets` are
    fractions of the component budget at which the references' mixtures are trained again with
    the next seed (trained proxies at a smaller budget: the cost of a training-based search at
    matched fidelity); `ablations` are merge methods and mappings whose proxies are scored
    against the same references (each a `merge` section; where it names no delta_dtype or
    delta_device, the run's apply); `seeds` repeats the protocol with run seed, run seed + 1, ...
    (see demix.recipes.reproduce for what the seeds share); `trained_search: false` leaves out
    the training-based search of the first seed (its cost is that of as many references).
    """

    references: int = Field(default=12, ge=2)
    replicates: int = Field(default=0, ge=0)
    sweep: list[StageTraining] = Field(default_factory=list)
    budgets: list[float] = Field(default_factory=list)
    ablations: list[MergeConfig] = Field(default_factory=list)
    seeds: int = Field(default=1, ge=1)
    trained_search: bool = True
    # false: fidelity only (no searches, no final models; the decision is reproduce-decision's)
    finals: bool = True

    @field_validator("budgets")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        bad = [f for f in value if not 0 < f < 1]
        if bad:
            raise ValueError(f"budgets are fractions of the component budget in (0, 1), got {bad}")
        return sorted(set(value), reverse=True)

    @model_validator(mode="after")
    def _replicates_fit(self) -> FidelityConfig:
        if self.replicates > self.references:
            raise ValueError(
                f"replicates ({self.replicates}) cannot exceed references ({self.references})"
            )
        return self


class DecisionConfig(Strict):
    """`demix reproduce-decision`: the searches compared at equal training tokens.

    `budgets`: multiples of the merged search's component tokens (the components are trained
    that much longer for the merged search; a trained-proxy search gets as many proxies of
    `proxy_fraction` x the component budget as the same tokens buy). `merged_proxies`: the
    merged searches' sizes (proxies over search.rounds rounds). `candidates` and `top_k`: the
    regression's pool and the top it averages (RegMix: 100k and 128). `seeds`: protocol seeds.
    """

    budgets: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], min_length=1)
    merged_proxies: list[int] = Field(default_factory=lambda: [21, 200], min_length=1)
    proxy_fraction: float = Field(default=0.125, gt=0, le=1)
    candidates: int = Field(default=100_000, ge=100)
    top_k: int = Field(default=128, ge=1)
    seeds: int = Field(default=3, ge=1)

    @field_validator("budgets")
    @classmethod
    def _multiples(cls, value: list[float]) -> list[float]:
        if any(b <= 0 for b in value):
            raise ValueError(f"budgets are positive multiples of the component tokens, got {value}")
        return sorted(set(value))

    @field_validator("merged_proxies")
    @classmethod
    def _sizes(cls, value: list[int]) -> list[int]:
        if any(n < 4 for n in value):
            raise ValueError(f"a merged search evaluates 4 or more proxies, got {value}")
        return sorted(set(value))


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
