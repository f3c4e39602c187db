"""Evaluate in-memory models on a run's tasks: lm-eval tasks and held-out loss, one result format.

A result is {task: {"metric", "value", "stderr", "higher_is_better", "n", "metrics", "per_doc"}}
whatever the task's source, so the scoring code never needs to know where a number came from.
`per_doc` holds the score of each document (each window of a held-out task) in an order that is
the same for every model and both engines, with `doc_weight` where documents weigh differently;
`per_doc.py` says what an element is for each kind of metric. They come from the per-document
results both engines produce anyway (no extra forward pass). (Over 400 lines as one coherent
thing: the Evaluator and its two engines' common result format.)

Primary metric per task: `acc_norm` for ranked-choice tasks, because unnormalised `acc` sums the
log-likelihood of each choice and so favours short choices; dividing by the choice's length in
characters removes most of that bias (what OLMo / DataDecide-style small-model evals report).
`bits_per_byte` for bits-per-byte tasks (lower is better) and `loss` (nats) for held-out tasks.

Engines: with `evaluate.engine: fast` (the default) every task that only asks for
log-likelihoods is scored by `fast.FastScorer` (requests built once, packed batches, lm-eval's own
metrics); generation tasks, and every task with `engine: lm-eval`, run through lm-eval's
`evaluate`. Both give the same numbers (accuracy exactly, continuous metrics to float noise).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from demix.config import EvaluateConfig
from demix.errors import ModelError, TaskError
from demix.evaluate.heldout import (
    HELDOUT_PREFIX,
    heldout_window,
    heldout_window_losses,
    window_loss_summary,
)
from demix.evaluate.packing import supports_packing
from demix.evaluate.per_doc import heldout_per_doc, lm_eval_per_doc
from demix.evaluate.suite import (
    BITS_PER_BYTE,
    BUNDLED_TASKS,
    TaskSuite,
    explained_task_errors,
    load_task_suite,
)
from demix.evaluate.tasks.demix_metrics import scored_text

if TYPE_CHECKING:
    from demix.evaluate.fast import FastScorer

# First present wins; any other lm-eval task falls back to its first reported metric.
PRIMARY_METRICS = ("acc_norm", "acc", "bits_per_byte", "exact_match", "loss")
DEFAULT_AUTO_WIDTH = 2048  # tokens per row assumed for batch_size auto when a model has no limit

# Warnings lm-eval prints every time an in-memory model is wrapped; expected here, so dropped.
_EXPECTED_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)

# Bootstrap is only used by lm-eval for a few metrics (perplexity, f1, bleu, ...) of non-bundled
# tasks; 1000 draws keep it to seconds instead of lm-eval's default 100000.
_BOOTSTRAP_ITERS = 1000

# The engines a task can be scored by (Evaluator.engines).
FAST = "fast"
LM_EVAL = "lm-eval"
HELDOUT = "heldout"

logger = logging.getLogger(__name__)

# Logged for every long document of every proxy; once per process says all there is to say.
_TRUNCATION_WARNING = "Combined length of context"


class _DropExpectedWarnings(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.truncation_reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(_TRUNCATION_WARNING):
            if self.truncation_reported:
                return False
            self.truncation_reported = True
            record.msg = message + " (further truncations are not reported)"
            return True
        return not message.startswith(_EXPECTED_WARNINGS)


def _quiet_lm_eval_logging() -> None:
    root = logging.getLogger("lm_eval")
    if root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if not any(isinstance(f, _DropExpectedWarnings) for f in hf_logger.filters):
        hf_logger.addFilter(_DropExpectedWarnings())


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """Swallow lm-eval's and datasets' tqdm bars (several per task per proxy), keep other output."""
    # tqdm reads its settings once at import and lm-eval has no switch for its task-building bars,
    # so stderr is captured instead. tqdm starts every refresh with "\r"; log lines never do.
    buffer = io.StringIO()
    real = sys.stderr
    failed = False
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        text = buffer.getvalue()
        if failed:
            real.write(text)
        else:
            # split("\n"), not splitlines(), which would also split at every "\r".
            kept = [line for line in text.split("\n") if line and "\r" not in line]
            real.write("".join(line + "\n" for line in kept))


class Evaluator:
    """Builds the configured tasks once; `evaluate(model)` scores one model on all of them.

    `tokenizer` is the HF tokenizer of the models to evaluate; `device` is where they run (a model
    on another device is moved there). `data` (a CuratedData) is needed for `heldout:<dataset>`
    tasks, `eval_data_dir` for the bundled demo tasks. `engines` says which engine scores each
    task ("fast", "lm-eval" or "heldout").
    """

    def __init__(
        self,
        config: EvaluateConfig,
        tokenizer: Any,
        device: str,
        data: Any | None = None,
        eval_data_dir: str | Path | None = None,
    ) -> None:
        """Load every task of config.categories.

        Raises TaskError for unknown tasks, missing eval files or held-out data, empty tasks, a
        task whose dataset is not available offline or whose data file is missing, and a template
        error (on any document the fast engine scores; on the first for the lm-eval engine).
        """
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.task_names: list[str] = config.tasks
        self._heldout: dict[str, np.ndarray] = {}
        lm_eval_names = []
        for name in self.task_names:
            if name.startswith(HELDOUT_PREFIX):
                self._heldout[name] = self._load_heldout(name, data)
            else:
                lm_eval_names.append(name)
        _quiet_lm_eval_logging()
        self._workdir = tempfile.TemporaryDirectory(prefix="demix-eval-")
        self._suite: TaskSuite | None = None
        self._fast: FastScorer | None = None
        self._fast_unsupported_reported = False
        self._longest_targets: dict[str, tuple[int, int]] = {}
        self._batch_rows: int | None = None if config.batch_size == "auto" else config.batch_size
        self.engines = {name: HELDOUT for name in self._heldout}
        if lm_eval_names:
            with _without_progress_bars():
                self._suite = load_task_suite(
                    lm_eval_names,
                    Path(self._workdir.name),
                    eval_data_dir=Path(eval_data_dir) if eval_data_dir is not None else None,
                    include_path=config.include_path,
                )
                self.engines.update(choose_engines(self._suite, config.engine))
                with explained_task_errors():  # the fast engine renders every document now
                    self._fast = self._build_fast_scorer()
            self._longest_targets = self._measure_bits_per_byte_targets()

    def _names(self, engine: str) -> list[str]:
        return [name for name in self.task_names if self.engines.get(name) == engine]

    def _build_fast_scorer(self) -> FastScorer | None:
        """Build the fast-engine tasks' requests once (None when no task uses the fast engine)."""
        names = self._names(FAST)
        if not names:
            return None
        from demix.evaluate.fast import FastScorer

        assert self._suite is not None
        task_dict = self._suite.task_dict_for(names)
        return FastScorer(
            task_dict["tasks"],
            task_dict["groups"],
            limit=self.config.limit,
            bootstrap_iters=_BOOTSTRAP_ITERS,
        )

    def _measure_bits_per_byte_targets(self) -> dict[str, tuple[int, int]]:
        """(tokens, document number) of the longest scored continuation of each bpb task."""
        assert self._suite is not None
        longest = {}
        for name in self._suite.files:
            if BUNDLED_TASKS[name] != BITS_PER_BYTE:
                continue
            docs = self._suite.task_dict["tasks"][name].eval_docs
            count = len(docs) if self.config.limit is None else min(self.config.limit, len(docs))
            sizes = []
            for doc in docs.select(range(count)):
                # Tokenized like lm-eval's HFLM: the whole text, minus the context's tokens.
                context = doc["context"].rstrip()
                whole = self.tokenizer.encode(
                    context + scored_text(doc["context"], doc["continuation"])
                )
                sizes.append(len(whole) - len(self.tokenizer.encode(context)))
            index = int(np.argmax(sizes))
            longest[name] = (sizes[index], index + 1)
        return longest

    def _check_targets_fit(self, max_length: int | None) -> None:
        # lm-eval asserts that a scored continuation fits the context window; say where instead.
        assert self._suite is not None
        for name, (tokens, number) in self._longest_targets.items():
            if max_length is not None and tokens > max_length:
                raise TaskError(
                    f"{self._suite.files[name]}: document {number} of task {name!r} has a "
                    f"{tokens}-token continuation, longer than the model's context of {max_length}; "
                    f"shorten that continuation, or raise evaluate.max_length if the model has a longer context"
                )

    def _load_heldout(self, task: str, data: Any | None) -> np.ndarray:
        dataset = task.removeprefix(HELDOUT_PREFIX)
        if data is None:
            raise TaskError(
                f"task {task!r} needs the curated dataset; pass data=CuratedData(...) to Evaluator"
            )
        known = [*data.names, *getattr(data, "targets", [])]
        if dataset not in known:
            raise TaskError(
                f"task {task!r}: no dataset or target {dataset!r}; known: {sorted(known)}"
            )
        tokens = np.asarray(data.tokens(dataset, "heldout")[: self.config.heldout_tokens])
        if len(tokens) < 2:
            raise TaskError(
                f"task {task!r}: the held-out split of {dataset!r} has {len(tokens)} tokens; "
                f"curate with a larger data.heldout_fraction"
            )
        return tokens.astype(np.int64)

    def evaluate(self, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
        """Score `model` on every task: {task: {metric, value, stderr, higher_is_better, n, metrics,
        per_doc (, doc_weight)}}.

        Runs in eval mode without gradients and restores the model's training mode.
        Raises ModelError when held-out token ids do not fit the model's vocabulary, TaskError
        when an lm-eval-engine task's template fails on a later document.
        """
        model.to(self.device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                results = self._run_tasks(model)
                results.update(self._run_heldout(model))
        finally:
            model.train(was_training)
        return {name: results[name] for name in self.task_names}

    def _max_length(self, model: torch.nn.Module) -> int | None:
        return self.config.max_length or getattr(model.config, "max_position_embeddings", None)

    def batch_rows(self, model: torch.nn.Module) -> int:
        """Rows per forward pass: evaluate.batch_size, or for `auto` chosen at the first model
        from the device's free memory (demix.evaluate.batch) and kept for every later one."""
        if self._batch_rows is None:
            from demix.evaluate.batch import auto_batch_rows

            width = self._max_length(model) or DEFAULT_AUTO_WIDTH
            self._batch_rows = auto_batch_rows(model, width, torch.device(self.device))
        return self._batch_rows

    def _run_heldout(self, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
        results = {}
        window = heldout_window(self._max_length(model))
        vocab_size = model.get_input_embeddings().num_embeddings
        for name, tokens in self._heldout.items():
            if int(tokens.max()) >= vocab_size:
                raise ModelError(
                    f"task {name!r}: held-out token id {int(tokens.max())} does not fit the "
                    f"model's vocabulary of {vocab_size}; evaluate models built for this dataset's "
                    f"tokenizer"
                )
            sums, counts = heldout_window_losses(model, tokens, window, self.batch_rows(model))
            loss, stderr = window_loss_summary(sums, counts)
            results[name] = {
                "metric": "loss",
                "value": loss,
                "stderr": stderr,
                "higher_is_better": False,
                "n": len(sums),
                "metrics": {"loss": loss},
                **heldout_per_doc(sums, counts),
            }
        return results

    def _run_tasks(self, model: torch.nn.Module) -> dict[str, dict[str, Any]]:
        """Results of the lm-eval tasks, each from its engine."""
        if self._suite is None:
            return {}
        self._check_targets_fit(self._max_length(model))
        fast_names, lm_eval_names = self._names(FAST), self._names(LM_EVAL)
        if fast_names and not self._fast_supports(model):
            fast_names, lm_eval_names = [], fast_names + lm_eval_names
        results = self._run_lm_eval(model, lm_eval_names) if lm_eval_names else {}
        if fast_names:
            results.update(self._run_fast(model, fast_names))
        return results

    def _fast_supports(self, model: torch.nn.Module) -> bool:
        reason = supports_packing(model)
        if reason is not None and not self._fast_unsupported_reported:
            logger.warning("evaluate.engine fast cannot run a model with %s; using lm-eval", reason)
            self._fast_unsupported_reported = True
        return reason is None

    def _run_fast(self, model: torch.nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
        assert self._suite is not None and self._fast is not None
        with _without_progress_bars():
            raw = self._fast.evaluate(
                model,
                self.tokenizer,
                self.device,
                self._max_length(model),
                self.batch_rows(model),
            )
        return {name: self._summarise(name, raw) for name in names}

    def _run_lm_eval(self, model: torch.nn.Module, names: list[str]) -> dict[str, dict[str, Any]]:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        assert self._suite is not None
        with _without_progress_bars():
            lm = HFLM(
                pretrained=model,
                tokenizer=self.tokenizer,
                device=self.device,
                batch_size=self.batch_rows(model),
                max_length=self._max_length(model),
            )
            # `limit` keeps the first N documents of each task (lm-eval slices its doc iterator),
            # so a fixed-order eval file gives the same subsample for every proxy.
            with explained_task_errors():  # as the fast engine says it, at its build
                raw = evaluate(
                    lm=lm,
                    task_dict=self._suite.task_dict_for(names),
                    limit=self.config.limit,
                    bootstrap_iters=_BOOTSTRAP_ITERS,
                    log_samples=True,
                )
        return {name: self._summarise(name, raw) for name in names}

    def _summarise(self, name: str, raw: dict[str, Any]) -> dict[str, Any]:
        """One task's result from either engine's lm-eval output."""
        assert self._suite is not None
        return _summarise(
            name,
            raw,
            self._suite.leaves[name],
            tasks=self._suite.task_dict["tasks"],
            group=self._suite.groups.get(name, {}).get(name),
        )


def choose_engines(suite: TaskSuite, engine: str) -> dict[str, str]:
    """The engine of each of the suite's names: lm-eval, or fast where `engine` is fast and all
    of a name's tasks ask only for log-likelihoods (generation tasks always go to lm-eval)."""
    from demix.evaluate.fast import is_fast_task

    tasks = suite.task_dict["tasks"]
    engines = {
        name: FAST
        if engine == FAST and all(is_fast_task(tasks[leaf]) for leaf in leaves)
        else LM_EVAL
        for name, leaves in suite.leaves.items()
    }
    # A task object belongs to one engine: lm-eval's evaluate rebuilds the requests of the tasks
    # it runs, so a task shared with an lm-eval name (a group and one of its tasks) goes there.
    changed = True
    while changed:
        taken = {leaf for n, e in engines.items() if e == LM_EVAL for leaf in suite.leaves[n]}
        changed = False
        for name, leaves in suite.leaves.items():
            if engines[name] == FAST and taken.intersection(leaves):
                engines[name], changed = LM_EVAL, True
    return engines


def _summarise(
    name: str,
    raw: dict[str, Any],
    leaves: list[str],
    tasks: dict[str, Any] | None = None,
    group: Any = None,
) -> dict[str, Any]:
    """One task's lm-eval output in demix's result format (per_doc None without `tasks`)."""
    reported = raw["results"].get(name, {})
    values: dict[str, tuple[str, str, float]] = {}
    for key, value in reported.items():
        metric, sep, filter_key = key.partition(",")
        if not sep or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        label = metric if filter_key == "none" else key
        values.setdefault(label, (metric, filter_key, float(value)))
    if not values:
        raise TaskError(
            f"lm-eval task {name!r} reported no numeric metric; name its subtasks in "
            f"evaluate.categories"
        )
    preferred = (label for m in PRIMARY_METRICS for label in values if values[label][0] == m)
    primary = next(preferred, next(iter(values)))
    metric, filter_key, value = values[primary]
    stderr = reported.get(f"{metric}_stderr,{filter_key}")
    if not isinstance(stderr, int | float):
        stderr = (
            _bits_per_byte_stderr(raw, leaves, filter_key)
            if metric == "bits_per_byte"
            else float("nan")
        )
    n_samples = raw.get("n-samples", {})
    if name in n_samples:
        n = int(n_samples[name]["effective"])
    else:
        n = sum(int(n_samples[leaf]["effective"]) for leaf in leaves if leaf in n_samples)
    return {
        "metric": primary,
        "value": value,
        "stderr": float(stderr),
        "higher_is_better": _higher_is_better(raw, name, metric),
        "n": n,
        "metrics": {label: v for label, (_, _, v) in values.items()},
        **(
            lm_eval_per_doc(raw, name, leaves, metric, filter_key, tasks, group)
            if tasks is not None
            else {"per_doc": None}
        ),
    }


def _higher_is_better(raw: dict[str, Any], name: str, metric: str) -> bool:
    direction = raw.get("higher_is_better", {}).get(name, {}).get(metric)
    if direction is None:
        from lm_eval.api.registry import is_higher_better

        direction = is_higher_better(metric)
    return True if direction is None else bool(direction)


def _bits_per_byte_stderr(raw: dict[str, Any], leaves: list[str], filter_key: str) -> float:
    """Delta-method stderr of the weighted bits per byte -sum(ll) / sum(bytes) / ln 2."""
    # lm-eval has no stderr for its weighted bits_per_byte (it reports "N/A"); the ratio
    # estimator's linearised variance is sum((ll_i - r * b_i)^2) / (n (n - 1) mean(b)^2).
    pairs = [
        sample["bits_per_byte"]
        for leaf in leaves
        for sample in raw.get("samples", {}).get(leaf, [])
        if sample.get("filter") == filter_key and "bits_per_byte" in sample
    ]
    if len(pairs) < 2:
        return float("nan")
    ll = np.array([p[0] for p in pairs], dtype=np.float64)
    nbytes = np.array([p[1] for p in pairs], dtype=np.float64)
    ratio = ll.sum() / nbytes.sum()
    n = len(pairs)
    variance = ((ll - ratio * nbytes) ** 2).sum() / (n * (n - 1) * nbytes.mean() ** 2)
    return float(math.sqrt(variance) / math.log(2))
