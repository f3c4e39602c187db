"""The fast engine: lm-eval's log-likelihood tasks scored with packed batches, same numbers.

lm-eval stays the definition of every task. Its task objects build their instances (prompts,
choices, rolling documents) once; HFLM's own code tokenizes them once (context/continuation split,
empty-context prefix token, rolling windows), captured by a subclass that records the token
requests instead of running the model. Per model only the forward work runs (`packing`), and the
(log-likelihood, is_greedy) responses go back to the tasks' own filters and `process_results` and
to lm-eval's aggregation, so metrics and standard errors come from lm-eval's code.

Generation tasks (`generate_until`) are not handled here; the Evaluator sends them to lm-eval.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# _process_results is the aggregation lm-eval's own `evaluate` ends with (per-task aggregation,
# standard errors, groups); calling it keeps every number lm-eval's (lm-eval is pinned).
from lm_eval.evaluator_utils import _process_results, get_sample_size
from lm_eval.models.huggingface import HFLM

from demix.errors import TaskError
from demix.evaluate.packing import Plan, TokenRequest, plan_requests, score_plan

# Output types whose requests are all log-likelihoods (multiple_choice: one per choice).
FAST_OUTPUT_TYPES = frozenset({"loglikelihood", "multiple_choice", "loglikelihood_rolling"})
_REQUEST_TYPES = frozenset({"loglikelihood", "loglikelihood_rolling"})


def is_fast_task(task: Any) -> bool:
    """Whether a loaded lm-eval task only asks for log-likelihoods (so the fast engine can run it)."""
    return getattr(task, "OUTPUT_TYPE", None) in FAST_OUTPUT_TYPES


class _RequestRecorder(HFLM):
    """HFLM that records the token requests it would score instead of running the model."""

    recorded: list[TokenRequest]

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
        self.recorded.extend(TokenRequest(tuple(ctx), tuple(cont)) for _, ctx, cont in requests)
        return [(0.0, False)] * len(requests)


@dataclass
class _Document:
    doc_id: int
    doc: Any
    instances: list[Any]


@dataclass
class _TaskRequests:
    """One task's instances, built once, grouped by document as lm-eval's evaluate groups them."""

    task: Any
    instances: list[Any]
    documents: list[_Document]


@dataclass
class _TokenPlan:
    """Token requests of every instance (in order) and their packed layout for one max_length."""

    plan: Plan
    # Per instance: (first request, number of requests); rolling documents have several windows.
    spans: list[tuple[int, int]] = field(default_factory=list)


class FastScorer:
    """Scores lm-eval log-likelihood tasks on any number of models; requests are built once.

    `tasks` are loaded lm-eval tasks (name -> Task, each `is_fast_task`), `groups` their groups as
    TaskManager.load returns them. `limit` keeps the first N documents of each task, as lm-eval's
    `limit` does. A forward pass holds about batch_size x max_length tokens; the batch is given
    per evaluation (the token plan is kept per max_length and batch size).
    """

    def __init__(
        self,
        tasks: dict[str, Any],
        groups: dict[str, Any],
        limit: int | None,
        bootstrap_iters: int,
    ) -> None:
        """Build every task's instances. Raises TaskError for a task that is not log-likelihood."""
        for name, task in tasks.items():
            if not is_fast_task(task):
                raise TaskError(
                    f"task {name!r} has output type {getattr(task, 'OUTPUT_TYPE', None)!r}; the "
                    f"fast engine scores only {sorted(FAST_OUTPUT_TYPES)}"
                )
        self.tasks = tasks
        self.groups = groups
        self.limit = limit
        self.bootstrap_iters = bootstrap_iters
        self._requests = {name: self._build(name, task) for name, task in tasks.items()}
        self._plans: dict[tuple[int | None, int], _TokenPlan] = {}

    def _build(self, name: str, task: Any) -> _TaskRequests:
        limit = get_sample_size(task, self.limit)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        # The task's own list: lm-eval's evaluate replaces it when it rebuilds requests (see
        # _refresh_stale_tasks).
        instances = task.instances
        for instance in instances:
            if instance.request_type not in _REQUEST_TYPES or instance.repeats != 1:
                raise TaskError(
                    f"task {name!r} asks for {instance.request_type!r} requests; the fast engine "
                    f"scores only log-likelihoods; set evaluate.engine: lm-eval"
                )
        by_document: dict[int, list[Any]] = defaultdict(list)
        for instance in instances:
            by_document[instance.doc_id].append(instance)
        documents = [
            _Document(doc_id, doc, sorted(by_document[doc_id], key=lambda i: i.idx))
            for doc_id, doc in task.doc_iterator(rank=0, limit=limit, world_size=1)
        ]
        return _TaskRequests(task, instances, documents)

    @property
    def documents(self) -> dict[str, int]:
        """Number of documents scored per task."""
        return {name: len(requests.documents) for name, requests in self._requests.items()}

    def token_plan(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: str,
        max_length: int | None,
        batch_size: int,
    ) -> _TokenPlan:
        """The layout of every request for this max_length and batch, tokenized once by HFLM's
        code.

        max_length None means HFLM's choice (from the model's config). Raises TaskError when a
        continuation does not fit the context.
        """
        self._refresh_stale_tasks()
        if (max_length, batch_size) not in self._plans:
            self._plans[max_length, batch_size] = self._tokenize(
                model, tokenizer, device, max_length, batch_size
            )
        return self._plans[max_length, batch_size]

    def _refresh_stale_tasks(self) -> None:
        # lm-eval's evaluate rebuilds a task's instances; if that happened to one of ours (the same
        # task object scored by lm-eval too), its requests and token plans are rebuilt as well.
        stale = [n for n, r in self._requests.items() if r.task.instances is not r.instances]
        for name in stale:
            self._requests[name] = self._build(name, self.tasks[name])
        if stale:
            self._plans.clear()

    def _tokenize(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: str,
        max_length: int | None,
        batch_size: int,
    ) -> _TokenPlan:
        recorder = _RequestRecorder(
            pretrained=model, tokenizer=tokenizer, device=device, max_length=max_length
        )
        recorder.recorded = []
        max_length = recorder.max_length
        spans = []
        for name, requests in self._requests.items():
            for instance in requests.instances:
                start = len(recorder.recorded)
                # Called per instance so that each rolling document's windows stay together.
                getattr(recorder, instance.request_type)([instance], disable_tqdm=True)
                spans.append((start, len(recorder.recorded) - start))
                self._check_fits(name, instance, recorder.recorded[start:], max_length)
        plan = plan_requests(recorder.recorded, max_length, batch_size)
        return _TokenPlan(plan, spans)

    @staticmethod
    def _check_fits(
        name: str, instance: Any, requests: list[TokenRequest], max_length: int
    ) -> None:
        for request in requests:
            if len(request.continuation) > max_length:
                raise TaskError(
                    f"task {name!r}, document {instance.doc_id}: a "
                    f"{len(request.continuation)}-token continuation does not fit the model's "
                    f"context of {max_length}; raise evaluate.max_length or shorten the document"
                )

    def evaluate(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: str,
        max_length: int | None,
        batch_size: int,
    ) -> dict[str, Any]:
        """Score `model` (in eval mode) on every task, `batch_size` packed rows per forward pass;
        lm-eval's result dict (results, samples...)."""
        token_plan = self.token_plan(model, tokenizer, device, max_length, batch_size)
        sums, greedy = score_plan(model, token_plan.plan)
        self._set_responses(token_plan, sums, greedy)
        accumulators = {name: self._collect(requests) for name, requests in self._requests.items()}
        results = _process_results(accumulators, self.groups, self.bootstrap_iters)
        return results._to_eval_results(samples=results.samples)

    def _set_responses(self, token_plan: _TokenPlan, sums: np.ndarray, greedy: np.ndarray) -> None:
        unique_of = token_plan.plan.unique_of
        loglikelihoods = sums[unique_of].tolist()
        is_greedy = greedy[unique_of].tolist()
        instances = (i for requests in self._requests.values() for i in requests.instances)
        for instance, (start, count) in zip(instances, token_plan.spans, strict=True):
            if instance.request_type == "loglikelihood":
                response: Any = (loglikelihoods[start], is_greedy[start])
            else:
                # HFLM sums a rolling document's windows in order, discarding is_greedy.
                response = sum(loglikelihoods[start : start + count])
            instance.resps = [response]

    @staticmethod
    def _collect(requests: _TaskRequests) -> dict[str, Any]:
        """Per-document metrics by the task's own filters and process_results, as evaluate does."""
        task = requests.task
        task.apply_filters()
        raw_metrics: dict[tuple[str, str], list[Any]] = defaultdict(list)
        samples = []
        for filter_key in requests.instances[0].filtered_resps:
            for document in requests.documents:
                metrics = task.process_results(
                    document.doc, [i.filtered_resps[filter_key] for i in document.instances]
                )
                # Only what demix reads back (per-document metrics by filter), not lm-eval's logs.
                samples.append({"doc_id": document.doc_id, "filter": filter_key, **metrics})
                for metric, value in metrics.items():
                    raw_metrics[(metric, filter_key)].append(value)
        return {"task": task, "raw_metrics": raw_metrics, "logged_samples": samples}
