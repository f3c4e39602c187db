"""The fast evaluation engine: packed scoring against direct computation, and both engines on
every bundled task (plus a rolling perplexity task) for two different tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from demix.config import EvaluateConfig
from demix.errors import TaskError
from demix.evaluate import BUNDLED_TASKS, Evaluator, per_doc_value
from demix.evaluate.packing import (
    TokenRequest,
    _split_tree,
    _Tree,
    effective_context,
    plan_requests,
    score_plan,
    supports_packing,
)
from tests.test_evaluate import BITS, RANKED, TEXT, bpe_tokenizer, write_jsonl

CONTEXT = 64  # the test models' context: long documents below are truncated or windowed

LONG = " ".join(TEXT[:6])  # about 120 tokens

# Long queries (truncated from the left), a question whose choices repeat (a tie both engines
# must break the same way), single-token and long choices.
RANKED_MORE = [
    {"query": LONG + "\nQuestion: what is 12 plus 7?\nAnswer:", "choices": ["19", "21"], "gold": 0},
    {"query": "The cat sleeps in the", "choices": ["sun", "sun", "dog"], "gold": 2},
    {"query": LONG, "choices": [TEXT[0], TEXT[3], "x"], "gold": 1},
    {"query": "12 + 7 =", "choices": [" 19", "19", "1", "9"], "gold": 1},
]
BITS_MORE = [
    {"context": LONG + "\nAnswer:", "continuation": " 12 + 7 = 19. The answer is 19."},
    {"context": "Paris is", "continuation": " " + TEXT[3]},
    {"context": "def add(a, b):\n", "continuation": "    return a + b\n\n\nprint(add(2, 3))\n"},
]
STORIES = [{"text": t} for t in (TEXT[0], LONG, TEXT[1] + TEXT[4], LONG + " " + LONG)]

ROLLING_TASK = {
    "task": "story_ppl",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "loglikelihood_rolling",
    "doc_to_text": "",
    "doc_to_target": "text",
    "metric_list": [
        {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
        for metric, aggregation in (
            ("word_perplexity", "weighted_perplexity"),
            ("byte_perplexity", "weighted_perplexity"),
            ("bits_per_byte", "bits_per_byte"),
        )
    ],
}

# Word perplexity alone: its per-document scores average geometrically.
WORD_PERPLEXITY_TASK = {
    **ROLLING_TASK,
    "task": "story_wppl",
    "metric_list": [
        {
            "metric": "word_perplexity",
            "aggregation": "weighted_perplexity",
            "higher_is_better": False,
        }
    ],
}

# A second rolling task of a different size, and a group averaging the two tasks' bits per byte
# unweighted (so its per-document weights must rescale each task's documents).
CODE_TASK = {
    **ROLLING_TASK,
    "task": "code_bpb",
    "metric_list": [
        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}
    ],
}
CODE = [{"text": t} for t in (TEXT[1], TEXT[4] + TEXT[1], BITS_MORE[2]["continuation"])]
GROUP = {
    "group": "ppl_group",
    "task": ["story_ppl", "code_bpb"],
    "aggregate_metric_list": [
        {"metric": "bits_per_byte", "aggregation": "mean", "weight_by_size": False}
    ],
}

GENERATION_TASK = {
    "task": "echo_gen",
    "dataset_path": "json",
    "test_split": "test",
    "output_type": "generate_until",
    "doc_to_text": "query",
    "doc_to_target": "answer",
    "generation_kwargs": {"until": ["\n"], "max_gen_toks": 3, "do_sample": False},
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
}


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def llama(vocab_size: int, seed: int, **overrides) -> LlamaForCausalLM:
    """A tiny random Llama with a 64-token context."""
    torch.manual_seed(seed)
    settings = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": CONTEXT,
        "attn_implementation": "eager",
        **overrides,
    }
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, LlamaForCausalLM]:
    """Two different models: eager attention, and sdpa with grouped-query attention and 3 layers."""
    vocab = len(tokenizer)
    return {
        "eager": llama(vocab, seed=0),
        "sdpa-gqa": llama(
            vocab,
            seed=1,
            attn_implementation="sdpa",
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    }


@pytest.fixture(scope="module")
def suite_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(eval data folder with every bundled task, include folder with a rolling and a
    generation task)."""
    root = tmp_path_factory.mktemp("fast_eval")
    eval_dir = root / "eval"
    eval_dir.mkdir()
    for name, kind in BUNDLED_TASKS.items():
        records = RANKED + RANKED_MORE if kind == "ranked_choice" else BITS + BITS_MORE
        write_jsonl(eval_dir / f"{name}.jsonl", records)
    tasks = root / "tasks"
    tasks.mkdir()
    write_jsonl(root / "stories.jsonl", STORIES)
    write_jsonl(root / "echo.jsonl", [{"query": "12 + 7 =", "answer": " 19"}] * 2)
    write_jsonl(root / "code.jsonl", CODE)
    for spec, data in (
        (ROLLING_TASK, "stories.jsonl"),
        (WORD_PERPLEXITY_TASK, "stories.jsonl"),
        (CODE_TASK, "code.jsonl"),
        (GENERATION_TASK, "echo.jsonl"),
    ):
        spec = {**spec, "dataset_kwargs": {"data_files": {"test": str(root / data)}}}
        (tasks / f"{spec['task']}.yaml").write_text(json.dumps(spec))
    (tasks / "ppl_group.yaml").write_text(json.dumps(GROUP))
    return eval_dir, tasks


def continuation_logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of log-probs, all greedy) of a token continuation, computed alone as HFLM does."""
    whole = (context + continuation)[-(CONTEXT + 1) :]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)[-len(continuation) :]
    targets = torch.tensor(continuation)
    chosen = logprobs[torch.arange(len(continuation)), targets]
    return chosen.sum().item(), bool((logprobs.argmax(dim=-1) == targets).all())


@pytest.fixture(params=["sdpa kernel", "eager kernel"])
def packing_model(request, models):
    """The eager-configured model, packed through SDPA (the default) or its own eager attention."""
    model = models["eager"]
    if request.param == "eager kernel":
        model._supports_sdpa = False  # instance attribute: this model has no SDPA to switch to
    yield model
    model.__dict__.pop("_supports_sdpa", None)


def test_packed_scores_equal_direct_computation(packing_model, tokenizer):
    model = packing_model
    question = tokenizer.encode("Question: what is 2 plus 3?\nAnswer:")
    long_context = tokenizer.encode(LONG)
    greedy = model.generate(
        torch.tensor([question]), max_new_tokens=4, do_sample=False, pad_token_id=0
    )[0, len(question) :].tolist()
    requests = [
        *(TokenRequest(tuple(question), tuple(tokenizer.encode(c))) for c in (" 5", " six", " 23")),
        TokenRequest(tuple(question), tuple(greedy)),  # greedy continuation
        TokenRequest(tuple(long_context), tuple(tokenizer.encode(" the lazy dog"))),  # truncated
        TokenRequest(tuple(long_context[:3]), tuple(long_context[3 : CONTEXT + 3])),  # fills it
        TokenRequest(tuple(question), tuple(tokenizer.encode(" 5"))),  # a duplicate
    ]
    plan = plan_requests(requests, CONTEXT, rows_per_batch=2)
    sums, is_greedy = score_plan(model, plan)
    assert model.config._attn_implementation == "eager"  # restored after scoring
    for index, request in enumerate(requests):
        expected, expected_greedy = continuation_logprob(
            model, list(request.context), list(request.continuation)
        )
        unique = plan.unique_of[index]
        assert sums[unique] == pytest.approx(expected, rel=1e-5)
        assert is_greedy[unique] == expected_greedy
    assert is_greedy[plan.unique_of[3]]
    # The question is read once for its four different answers, not four times.
    assert plan.n_unique == len(requests) - 1
    question_tokens = len(question) + sum(len(r.continuation) - 1 for r in requests[:4])
    assert plan.tokens == question_tokens + CONTEXT + CONTEXT


def test_effective_context_keeps_what_hflm_reads():
    request = TokenRequest(tuple(range(10)), (10, 11, 12))
    assert effective_context(request, 100) == tuple(range(10))
    # HFLM keeps the last max_length + 1 tokens and drops the final one as input.
    assert effective_context(request, 5) == (7, 8, 9)


def test_long_trees_are_split_with_the_context_repeated():
    tree = _Tree((1, 2, 3), [(0, (4, 5, 6)), (1, (7, 8)), (2, (9, 10, 11))])
    pieces = _split_tree(tree, row_tokens=6)
    assert [p.size for p in pieces] == [6, 5]
    assert all(p.context == (1, 2, 3) for p in pieces)
    assert [r for p in pieces for r, _ in p.branches] == [0, 1, 2]


def test_plan_refuses_a_continuation_longer_than_the_context():
    with pytest.raises(ValueError, match="does not fit"):
        plan_requests([TokenRequest((1,), tuple(range(CONTEXT + 1)))], CONTEXT, 4)


def evaluate_with(engine: str, model, tokenizer, suite_dirs, names: list[str]) -> dict:
    eval_dir, include = suite_dirs
    config = EvaluateConfig(
        categories={"all": names}, engine=engine, batch_size=3, include_path=str(include)
    )
    evaluator = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir)
    return evaluator.evaluate(model)


def assert_same_results(fast: dict, reference: dict) -> None:
    """Accuracies equal exactly; continuous metrics and standard errors to 1e-5 relative."""
    assert list(fast) == list(reference)
    for task, expected in reference.items():
        got = fast[task]
        assert (got["metric"], got["higher_is_better"], got["n"]) == (
            expected["metric"],
            expected["higher_is_better"],
            expected["n"],
        ), task
        assert set(got["metrics"]) == set(expected["metrics"]), task
        for metric, value in expected["metrics"].items():
            if metric.startswith("acc"):
                assert got["metrics"][metric] == value, (task, metric)
            else:
                assert got["metrics"][metric] == pytest.approx(value, rel=1e-5), (task, metric)
        if math.isnan(expected["stderr"]):
            assert math.isnan(got["stderr"]), task
        else:
            assert got["stderr"] == pytest.approx(expected["stderr"], rel=1e-5), task


@pytest.mark.parametrize("model_name", ["eager", "sdpa-gqa"])
def test_fast_engine_equals_lm_eval_on_every_bundled_task(
    model_name, models, tokenizer, suite_dirs
):
    names = [*BUNDLED_TASKS, "story_ppl"]
    model = models[model_name]
    fast = evaluate_with("fast", model, tokenizer, suite_dirs, names)
    reference = evaluate_with("lm-eval", model, tokenizer, suite_dirs, names)
    assert_same_results(fast, reference)
    # The comparison has teeth: documents were truncated, windowed and scored non-trivially.
    assert fast["story_ppl"]["metrics"].keys() == {
        "word_perplexity",
        "byte_perplexity",
        "bits_per_byte",
    }
    assert fast["gsm8k_bpb"]["n"] == len(BITS + BITS_MORE)
    assert fast["arc_easy"]["stderr"] > 0


def test_both_engines_give_the_same_per_document_scores(models, tokenizer, suite_dirs):
    eval_dir, include = suite_dirs
    names = [*BUNDLED_TASKS, "story_ppl", "story_wppl", "ppl_group"]
    model = models["sdpa-gqa"]
    evaluators = {
        engine: Evaluator(
            EvaluateConfig(
                categories={"all": names}, engine=engine, batch_size=3, include_path=str(include)
            ),
            tokenizer,
            "cpu",
            eval_data_dir=eval_dir,
        )
        for engine in ("fast", "lm-eval")
    }
    fast, reference = (evaluators[e].evaluate(model) for e in ("fast", "lm-eval"))
    for task in names:
        got, expected = fast[task], reference[task]
        assert len(got["per_doc"]) == got["n"] == len(expected["per_doc"]), task
        if got["metric"].startswith("acc"):
            assert got["per_doc"] == expected["per_doc"], task
        else:
            assert got["per_doc"] == pytest.approx(expected["per_doc"], rel=1e-4), task
            assert len(set(got["per_doc"])) == len(got["per_doc"]), task  # order matters
        for key in ("doc_weight", "per_doc_mean"):
            assert got.get(key) == expected.get(key), (task, key)
        for result in (got, expected):
            assert per_doc_value(result) == pytest.approx(result["value"], abs=1e-6), task
    # What each kind of task's elements are: its metric per document, and the weights that
    # give back the value.
    assert (fast["story_wppl"]["metric"], fast["story_wppl"]["per_doc_mean"]) == (
        "word_perplexity",
        "geometric",
    )
    group = fast["ppl_group"]
    assert group["metric"] == "bits_per_byte" and group["n"] == len(STORIES) + len(CODE)
    assert group["per_doc"][: len(STORIES)] == fast["story_ppl"]["per_doc"]
    # Unweighted over the two tasks: each task's documents weigh 1 in all.
    weights = np.array(group["doc_weight"])
    assert [weights[: len(STORIES)].sum(), weights[len(STORIES) :].sum()] == pytest.approx([1, 1])
    # A second call of the (plan-caching) fast engine gives the same arrays.
    again = evaluators["fast"].evaluate(model)
    assert [again[t]["per_doc"] for t in names] == [fast[t]["per_doc"] for t in names]


def test_two_models_get_different_numbers(models, tokenizer, suite_dirs):
    names = ["hellaswag", "mbpp_bpb", "story_ppl"]
    first, second = (
        evaluate_with("fast", m, tokenizer, suite_dirs, names) for m in models.values()
    )
    assert first["mbpp_bpb"]["value"] != second["mbpp_bpb"]["value"]
    assert first["story_ppl"]["value"] != second["story_ppl"]["value"]


def test_generation_tasks_route_to_lm_eval(models, tokenizer, suite_dirs):
    eval_dir, include = suite_dirs
    config = EvaluateConfig(
        categories={"math": ["echo_gen", "basic_skills_arithmetic"]},
        include_path=str(include),
        limit=2,
    )
    evaluator = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir)
    assert evaluator.engines == {"echo_gen": "lm-eval", "basic_skills_arithmetic": "fast"}
    result = evaluator.evaluate(models["eager"])
    assert result["echo_gen"]["metric"] == "exact_match"
    assert result["echo_gen"]["n"] == 2
    assert result["basic_skills_arithmetic"]["n"] == 2


def test_fast_scorer_refuses_a_generation_task(tokenizer, suite_dirs):
    from demix.evaluate.fast import FastScorer
    from demix.evaluate.suite import load_task_suite

    _, include = suite_dirs
    suite = load_task_suite(["echo_gen"], include.parent / "work", include_path=str(include))
    with pytest.raises(TaskError, match="echo_gen.*generate_until"):
        FastScorer(suite.task_dict["tasks"], {}, limit=2, bootstrap_iters=0)


def test_engine_lm_eval_runs_everything_through_lm_eval(tokenizer, suite_dirs):
    eval_dir, include = suite_dirs
    config = EvaluateConfig(
        categories={"all": ["arc_easy", "story_ppl"]}, engine="lm-eval", include_path=str(include)
    )
    evaluator = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir)
    assert evaluator.engines == {"arc_easy": "lm-eval", "story_ppl": "lm-eval"}


def test_models_the_packed_layout_cannot_run_are_named(models):
    assert supports_packing(models["eager"]) is None
    assert supports_packing(models["sdpa-gqa"]) is None
    windowed = LlamaForCausalLM(
        LlamaConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    )
    windowed.config.sliding_window = 16
    assert "sliding-window" in supports_packing(windowed)


def test_limit_keeps_the_first_documents(models, tokenizer, suite_dirs):
    eval_dir, include = suite_dirs
    config = EvaluateConfig(categories={"all": ["hellaswag"]}, limit=3)
    evaluator = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir)
    documents = evaluator._fast.documents
    assert documents == {"hellaswag": 3}
    kept = [d.doc for d in evaluator._fast._requests["hellaswag"].documents]
    assert [d["query"] for d in kept] == [r["query"] for r in RANKED[:3]]
    assert np.isfinite(evaluator.evaluate(models["eager"])["hellaswag"]["value"])


def test_a_model_the_fast_engine_cannot_run_goes_to_lm_eval(
    monkeypatch, caplog, models, tokenizer, suite_dirs
):
    from demix.evaluate import harness

    eval_dir, _ = suite_dirs
    config = EvaluateConfig(categories={"all": ["arc_easy", "gsm8k_bpb"]}, batch_size=3)
    evaluator = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir)
    model = models["eager"]
    fast = evaluator.evaluate(model)
    monkeypatch.setattr(harness, "supports_packing", lambda model: "a test attention")
    with caplog.at_level("WARNING", logger="demix.evaluate.harness"):
        fallback = evaluator.evaluate(model)
    assert "cannot run a model with a test attention; using lm-eval" in caplog.text
    assert_same_results(fast, fallback)
    # lm-eval rebuilt those tasks' requests; the fast engine notices and builds its own again
    # (stale requests would keep the first model's responses).
    monkeypatch.undo()
    other = models["sdpa-gqa"]
    expected = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir).evaluate(other)
    assert evaluator.evaluate(other) == expected
