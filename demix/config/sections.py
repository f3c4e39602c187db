"""The run config's stage sections: train (and its roles' schedules), merge, evaluate, search
(sampler, predictor), final and fidelity."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

import demix.config.bounds as bounds
from demix.config.data import Strict, positive
from demix.errors import ConfigError
from demix.merge.registry import METHOD_PARAMETERS

# What `demix train --role` and the training stage take, in training order: the one registry of
# training roles (demix.train.roles says what each trains on and starts from).
TRAINING_ROLES = ("base", "component", "reference", "control", "final")


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

    tokens: int = Field(gt=0, le=bounds.MAX_TRAINING_TOKENS)
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_tokens: int | None = Field(default=None, gt=0, le=bounds.MAX_TRAINING_TOKENS)
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

    seq_len: int = Field(default=128, ge=8, le=bounds.MAX_SEQ_LEN)
    batch_size: int = Field(default=16, ge=1, le=bounds.MAX_BATCH_ROWS)
    micro_batch_size: int | None = Field(default=None, ge=1, le=bounds.MAX_BATCH_ROWS)
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


# The parameters each merge method takes, from the method registry (demix.merge.registry).
MERGE_METHOD_PARAMETERS: dict[str, tuple[str, ...]] = dict(METHOD_PARAMETERS)


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

    method: str = "linear"  # a name of demix.merge.registry.METHOD_PARAMETERS
    weights: Literal["data", "component", "hull"] = "component"
    scale: float | None = Field(default=None, allow_inf_nan=False)
    density: float | None = Field(default=None, gt=0, le=1)
    drop_rate: float | None = Field(default=None, ge=0, lt=1)
    seed: int | None = None
    delta_dtype: Literal["float32", "bfloat16"] = "float32"
    delta_device: Literal["auto", "device", "host"] = "auto"
    output_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    shard_bytes: int = Field(default=2 * 1024**3, gt=0, le=bounds.MAX_SHARD_BYTES)

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHOD_PARAMETERS:
            raise ValueError(f"unknown merge method {value!r}; known: {sorted(METHOD_PARAMETERS)}")
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
    limit: int | None = Field(default=100, ge=1, le=bounds.MAX_EVAL_DOCUMENTS)
    batch_size: Annotated[int, Field(ge=1, le=bounds.MAX_EVAL_BATCH)] | Literal["auto"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int | None = Field(default=None, le=bounds.MAX_POSITIONS)
    heldout_tokens: int = Field(default=16384, ge=1, le=bounds.MAX_EVAL_DOCUMENTS)
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
    num_scales: int = Field(default=15, ge=1, le=bounds.MAX_SAMPLER_SCALES)
    cap_factor: float = Field(default=4.0, gt=0)
    min_weight: float = Field(default=2e-4, ge=0)
    grid: float = Field(default=2e-4, gt=0, lt=1)


class PredictorConfig(Strict):
    """The regressor mixture -> search target: `kind` lightgbm (the paper's), ridge (the authors'
    fallback for few points) or auto (per fit, the one with the higher cross-validated
    Spearman; the report says which and why)."""

    kind: Literal["lightgbm", "ridge", "auto"] = "lightgbm"
    ridge_alpha: float = Field(default=1.0, gt=0)

    num_iterations: int = Field(default=300, ge=1, le=bounds.MAX_PREDICTOR_ITERATIONS)
    learning_rate: float = Field(default=0.01, gt=0)
    num_leaves: int = Field(default=31, ge=2, le=bounds.MAX_PREDICTOR_LEAVES)
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
    n: int = Field(default=8, ge=4, le=bounds.MAX_PROXIES)
    rounds: int = Field(default=3, ge=1, le=bounds.MAX_ROUNDS)
    # the authors' pool and final top (train_predictor.py); top_k is also the predicted top an
    # intermediate round draws its proposals from
    candidates: int = Field(default=200_000, ge=100, le=bounds.MAX_CANDIDATES)
    top_k: int = Field(default=1280, ge=1, le=bounds.MAX_CANDIDATES)
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

    seeds: int = Field(default=1, ge=1, le=bounds.MAX_SEEDS)


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

    references: int = Field(default=12, ge=2, le=bounds.MAX_REFERENCES)
    replicates: int = Field(default=0, ge=0, le=bounds.MAX_REFERENCES)
    sweep: list[StageTraining] = Field(default_factory=list)
    budgets: list[float] = Field(default_factory=list)
    ablations: list[MergeConfig] = Field(default_factory=list)
    seeds: int = Field(default=1, ge=1, le=bounds.MAX_SEEDS)
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
    candidates: int = Field(default=100_000, ge=100, le=bounds.MAX_CANDIDATES)
    top_k: int = Field(default=128, ge=1, le=bounds.MAX_CANDIDATES)
    seeds: int = Field(default=3, ge=1, le=bounds.MAX_SEEDS)

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
        if any(n > bounds.MAX_PROXIES for n in value):
            raise ValueError(f"a merged search evaluates at most {bounds.MAX_PROXIES} proxies")
        return sorted(set(value))
