"""Evaluation layer: real lm-eval on tiny eval files, a real tiny Llama, hand-computed metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from demix.config import EvaluateConfig
from demix.errors import TaskError
from demix.evaluate import (
    BUNDLED_TASKS,
    Evaluator,
    oriented,
    oriented_values,
    per_doc_value,
    percentile_ranks,
    score_models,
)
from demix.evaluate.heldout import heldout_token_windows

TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Question: what is 12 plus 7? Answer: 12 + 7 = 19. The answer is 19.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "for i in range(10):\n    total += i * i\nreturn total\n",
    "A farmer has 3 fields with 14 cows each, so he has 3 * 14 = 42 cows.",
] * 12

RANKED = [
    {"query": "Question: what is 2 plus 3?\nAnswer:", "choices": ["5", "six", "23"], "gold": 0},
    {"query": "The capital of France is", "choices": ["Berlin", "Paris"], "gold": 1},
    {"query": "def add(a, b): return", "choices": ["a + b", "a * b", "print(a)"], "gold": 0},
    {"query": "The quick brown fox jumps over the", "choices": ["lazy dog", "sun"], "gold": 0},
    {"query": "12 + 7 =", "choices": ["19", "21", "5"], "gold": 0},
    {"query": "The cat sleeps in the", "choices": ["sun", "range(10)", "capital"], "gold": 0},
]

BITS = [
    {"context": "Question: a farmer has 3 fields.\nAnswer:", "continuation": " 3 * 14 = 42 cows."},
    {"context": "def add(a, b):\n", "continuation": "    return a + b\n"},
    {"context": "Paris is the", "continuation": " capital of France."},
    {"context": "for i in range(10):\n", "continuation": "    total += i * i\n"},
    {"context": "The answer is", "continuation": " 19."},
    {"context": "Berlin is", "continuation": " the capital of Germany. é"},
]

LIMIT = 4
HELDOUT_TOKENS = 300


class HeldoutData:
    """The two members of CuratedData the Evaluator uses for held-out tasks."""

    def __init__(self, streams: dict[str, np.ndarray]) -> None:
        self.streams = streams
        self.names = list(streams)

    def tokens(self, name: str, split: str = "train") -> np.ndarray:
        assert split == "heldout"
        return self.streams[name]


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab 300) trained on TEXT."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return bpe_tokenizer()


def tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def model(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(len(tokenizer), seed=0)


@pytest.fixture(scope="session")
def other_model(tokenizer) -> LlamaForCausalLM:
    return tiny_llama(len(tokenizer), seed=1)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    for name, kind in BUNDLED_TASKS.items():
        write_jsonl(root / f"{name}.jsonl", RANKED if kind == "ranked_choice" else BITS)
    return root


@pytest.fixture(scope="session")
def heldout_data(tokenizer) -> HeldoutData:
    ids = tokenizer.encode(" ".join(TEXT))
    return HeldoutData(
        {
            "web": np.array(ids[:400], dtype=np.uint16),
            "code": np.array(ids[400:], dtype=np.uint16),
        }
    )


CATEGORIES = {
    "general": ["arc_easy", "hellaswag", "heldout:web"],
    "math": ["basic_skills_arithmetic", "gsm8k_bpb", "math500_bpb"],
    "code": ["basic_skills_coding", "humaneval_bpb", "mbpp_bpb", "heldout:code"],
}


@pytest.fixture(scope="session")
def evaluator(tokenizer, eval_dir, heldout_data) -> Evaluator:
    config = EvaluateConfig(
        categories=CATEGORIES, limit=LIMIT, batch_size=4, heldout_tokens=HELDOUT_TOKENS
    )
    return Evaluator(config, tokenizer, "cpu", data=heldout_data, eval_data_dir=eval_dir)


@pytest.fixture(scope="session")
def result(evaluator, model) -> dict:
    return evaluator.evaluate(model)


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probs of the continuation's tokens, tokenized the way lm-eval's HFLM does."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(
        logprobs[position - 1, whole[position]].item()
        for position in range(len(context_ids), len(whole))
    )


def test_result_has_every_task_with_its_primary_metric(result):
    expected = [task for tasks in CATEGORIES.values() for task in tasks]
    assert list(result) == expected
    for task, task_result in result.items():
        assert set(task_result) - {"doc_weight"} == {
            "metric",
            "value",
            "stderr",
            "higher_is_better",
            "n",
            "metrics",
            "per_doc",
        }
        assert math.isfinite(task_result["value"])
        assert task_result["metrics"][task_result["metric"]] == task_result["value"]
        if task.startswith("heldout:"):
            assert (task_result["metric"], task_result["higher_is_better"]) == ("loss", False)
        elif BUNDLED_TASKS[task] == "ranked_choice":
            assert (task_result["metric"], task_result["higher_is_better"]) == ("acc_norm", True)
            assert set(task_result["metrics"]) == {"acc", "acc_norm"}
            assert task_result["n"] == LIMIT
        else:
            assert (task_result["metric"], task_result["higher_is_better"]) == (
                "bits_per_byte",
                False,
            )
            assert task_result["n"] == LIMIT
            assert task_result["stderr"] > 0


def test_bits_per_byte_matches_hand_computation(result, model, tokenizer):
    docs = BITS[:LIMIT]
    loglikelihood = sum(
        continuation_logprob(model, tokenizer, d["context"], d["continuation"]) for d in docs
    )
    # Bytes scored include the context's trailing whitespace that lm-eval moves onto the target.
    scored_bytes = sum(
        len((d["context"][len(d["context"].rstrip()) :] + d["continuation"]).encode()) for d in docs
    )
    expected = -loglikelihood / scored_bytes / math.log(2)
    assert result["gsm8k_bpb"]["value"] == pytest.approx(expected, rel=1e-5)
    assert result["mbpp_bpb"]["value"] == pytest.approx(expected, rel=1e-5)


def test_ranked_choice_accuracy_matches_hand_computation(result, model, tokenizer):
    correct = correct_norm = 0
    for doc in RANKED[:LIMIT]:
        lls = [
            continuation_logprob(model, tokenizer, doc["query"], " " + choice)
            for choice in doc["choices"]
        ]
        lengths = [len(choice) for choice in doc["choices"]]
        correct += int(np.argmax(lls)) == doc["gold"]
        correct_norm += int(np.argmax(np.array(lls) / lengths)) == doc["gold"]
    assert result["arc_easy"]["metrics"]["acc"] == pytest.approx(correct / LIMIT)
    assert result["arc_easy"]["value"] == pytest.approx(correct_norm / LIMIT)


def test_heldout_loss_matches_hand_computation(result, model, heldout_data):
    tokens = torch.tensor(heldout_data.streams["web"][:HELDOUT_TOKENS].astype(np.int64))
    window = 128  # the model's context (max_position_embeddings), under the 256 cap
    losses = []
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, window):
            chunk = tokens[start : start + window + 1]
            logits = model(input_ids=chunk[None, :-1]).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="none"))
    all_losses = torch.cat(losses)
    assert len(all_losses) == HELDOUT_TOKENS - 1
    assert result["heldout:web"]["value"] == pytest.approx(all_losses.mean().item(), rel=1e-5)
    means = np.array([loss.mean().item() for loss in losses])
    assert result["heldout:web"]["n"] == 3
    assert result["heldout:web"]["stderr"] == pytest.approx(
        means.std(ddof=1) / math.sqrt(3), rel=1e-4
    )


def test_heldout_windows_cover_every_target_once():
    windows = heldout_token_windows(np.arange(300), 128)
    assert windows == [(0, 128), (128, 128), (256, 43)]


def test_evaluate_is_deterministic_and_restores_training_mode(evaluator, model, result):
    model.train()
    again = evaluator.evaluate(model)
    assert model.training
    model.eval()
    assert again == result


def test_different_models_get_different_numbers(evaluator, other_model, result):
    other = evaluator.evaluate(other_model)
    assert other["gsm8k_bpb"]["value"] != result["gsm8k_bpb"]["value"]
    assert other["heldout:code"]["value"] != result["heldout:code"]["value"]


def test_per_doc_has_a_score_per_document_whose_weighted_mean_is_the_value(result):
    for task, task_result in result.items():
        per_doc = task_result["per_doc"]
        assert len(per_doc) == task_result["n"], task
        assert all(isinstance(score, float) for score in per_doc), task
        # Weighted by bytes (bits per byte) and tokens (held-out windows); a plain mean is
        # 0.01 or more off for these documents, so a missing or misaligned weight fails here.
        assert per_doc_value(task_result) == pytest.approx(task_result["value"], abs=1e-6), task
        if task.startswith("heldout:") or BUNDLED_TASKS[task] == "bits_per_byte":
            assert len(task_result["doc_weight"]) == len(per_doc), task
        else:
            assert set(per_doc) <= {0.0, 1.0} and "doc_weight" not in task_result, task


def test_per_doc_matches_each_document_by_hand(result, model, tokenizer, heldout_data):
    docs = BITS[:LIMIT]
    lls = [continuation_logprob(model, tokenizer, d["context"], d["continuation"]) for d in docs]
    scored_bytes = [
        len((d["context"][len(d["context"].rstrip()) :] + d["continuation"]).encode()) for d in docs
    ]
    bits = [-ll / n / math.log(2) for ll, n in zip(lls, scored_bytes, strict=True)]
    assert len(set(np.round(bits, 3))) == LIMIT  # distinct, so any reordering fails below
    assert result["gsm8k_bpb"]["per_doc"] == pytest.approx(bits, rel=1e-5)
    assert result["gsm8k_bpb"]["doc_weight"] == scored_bytes

    correct_norm = []
    for doc in RANKED[:LIMIT]:
        lls = [
            continuation_logprob(model, tokenizer, doc["query"], " " + choice)
            for choice in doc["choices"]
        ]
        lengths = [len(choice) for choice in doc["choices"]]
        correct_norm.append(float(int(np.argmax(np.array(lls) / lengths)) == doc["gold"]))
    assert result["arc_easy"]["per_doc"] == correct_norm

    tokens = torch.tensor(heldout_data.streams["web"][:HELDOUT_TOKENS].astype(np.int64))
    window_losses = []
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, 128):
            chunk = tokens[start : start + 129]
            logits = model(input_ids=chunk[None, :-1]).logits[0]
            window_losses.append(torch.nn.functional.cross_entropy(logits, chunk[1:]).item())
    assert result["heldout:web"]["per_doc"] == pytest.approx(window_losses, rel=1e-5)
    assert result["heldout:web"]["doc_weight"] == [128, 128, 43]


def test_per_doc_is_identical_on_a_second_call(evaluator, model, result):
    again = evaluator.evaluate(model)
    for task, task_result in result.items():
        assert again[task]["per_doc"] == task_result["per_doc"], task
        assert again[task].get("doc_weight") == task_result.get("doc_weight"), task


def test_per_doc_value_resamples_documents():
    weighted = {"metric": "bits_per_byte", "per_doc": [1.0, 2.0, 4.0], "doc_weight": [1, 1, 2]}
    assert per_doc_value(weighted) == pytest.approx(11 / 4)
    # A bootstrap draw: document 2 twice, document 0 once.
    assert per_doc_value(weighted, [2, 2, 0]) == pytest.approx((4 * 2 * 2 + 1) / 5)
    assert per_doc_value({"per_doc": [0.0, 1.0, 1.0]}, np.array([True, False, True])) == 0.5
    geometric = {"per_doc": [2.0, 8.0], "doc_weight": [1, 1], "per_doc_mean": "geometric"}
    assert per_doc_value(geometric) == pytest.approx(4.0)
    with pytest.raises(TaskError, match="'f1' result has no per-document scores"):
        per_doc_value({"metric": "f1", "per_doc": None})


def test_unknown_task_is_a_task_error(tokenizer, eval_dir):
    config = EvaluateConfig(categories={"general": ["arc_easy", "no_such_task_xyz"]})
    with pytest.raises(TaskError, match="no_such_task_xyz.*lm-eval ls tasks"):
        Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir)


def test_missing_eval_file_is_a_task_error(tokenizer, tmp_path):
    config = EvaluateConfig(categories={"general": ["hellaswag"]})
    with pytest.raises(TaskError, match=r"hellaswag\.jsonl.*missing.*fetch-demo"):
        Evaluator(config, tokenizer, "cpu", eval_data_dir=tmp_path)


def test_empty_or_malformed_eval_file_is_a_task_error(tokenizer, tmp_path):
    config = EvaluateConfig(categories={"math": ["gsm8k_bpb"]})
    (tmp_path / "gsm8k_bpb.jsonl").write_text("\n")
    with pytest.raises(TaskError, match="no documents"):
        Evaluator(config, tokenizer, "cpu", eval_data_dir=tmp_path)
    write_jsonl(tmp_path / "gsm8k_bpb.jsonl", [BITS[0], {"context": "x"}])
    with pytest.raises(TaskError, match=r"gsm8k_bpb\.jsonl:2: 'continuation'"):
        Evaluator(config, tokenizer, "cpu", eval_data_dir=tmp_path)
    (tmp_path / "gsm8k_bpb.jsonl").write_text(json.dumps(BITS[0]) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(
        TaskError, match=r"gsm8k_bpb\.jsonl:2: not valid JSON \(nested too deeply\)"
    ):
        Evaluator(config, tokenizer, "cpu", eval_data_dir=tmp_path)


def test_heldout_task_needs_a_known_dataset(tokenizer, heldout_data):
    config = EvaluateConfig(categories={"general": ["heldout:nope"]})
    with pytest.raises(TaskError, match="no dataset or target 'nope'"):
        Evaluator(config, tokenizer, "cpu", data=heldout_data)
    with pytest.raises(TaskError, match="pass data="):
        Evaluator(config, tokenizer, "cpu")


def task_result(value: float, higher_is_better: bool) -> dict:
    return {
        "metric": "m",
        "value": value,
        "stderr": 0.0,
        "higher_is_better": higher_is_better,
        "n": 1,
        "metrics": {"m": value},
    }


def test_percentile_ranks_average_ties():
    # sorted: 0.1 (rank 0), 0.5 0.5 (ranks 1, 2 -> 1.5), 0.9 (rank 3); divided by n - 1 = 3
    assert percentile_ranks([0.5, 0.1, 0.9, 0.5]).tolist() == [0.5, 0.0, 1.0, 0.5]
    assert percentile_ranks([3.0, 3.0, 3.0]).tolist() == [0.5, 0.5, 0.5]
    assert percentile_ranks([7.0]).tolist() == [0.5]


def test_loss_like_metrics_are_negated():
    assert oriented(task_result(2.5, higher_is_better=False)) == -2.5
    assert oriented(task_result(0.25, higher_is_better=True)) == 0.25
    flat = oriented_values({"a": task_result(0.3, True), "b": task_result(1.2, False)})
    assert flat == {"a": 0.3, "b": -1.2}


def test_score_models_averages_tasks_then_categories():
    # acc: higher is better; bpb and loss: lower is better.
    results = [
        {
            "acc": task_result(0.2, True),
            "bpb": task_result(1.0, False),
            "loss": task_result(3, False),
        },
        {
            "acc": task_result(0.4, True),
            "bpb": task_result(2.0, False),
            "loss": task_result(3, False),
        },
        {
            "acc": task_result(0.4, True),
            "bpb": task_result(3.0, False),
            "loss": task_result(2, False),
        },
    ]
    categories = {"general": ["acc", "loss"], "math": ["bpb"]}
    scores = score_models(results, categories)
    # acc ranks: 0, 0.75, 0.75; loss (negated -3, -3, -2): 0.25, 0.25, 1; bpb (negated): 1, 0.5, 0
    assert scores[0]["categories"] == pytest.approx({"general": 0.125, "math": 1.0})
    assert scores[1]["categories"] == pytest.approx({"general": 0.5, "math": 0.5})
    assert scores[2]["categories"] == pytest.approx({"general": 0.875, "math": 0.0})
    assert [s["ranking_score"] for s in scores] == pytest.approx([0.5625, 0.5, 0.4375])


def test_score_models_on_real_results_prefers_the_better_model(result):
    worse = {
        task: dict(r, value=r["value"] + (1 if not r["higher_is_better"] else -1))
        for task, r in result.items()
    }
    scores = score_models([result, worse], CATEGORIES)
    assert [s["ranking_score"] for s in scores] == [1.0, 0.0]


def test_score_models_needs_every_task():
    with pytest.raises(TaskError, match="no task 'b'"):
        score_models([{"a": task_result(1.0, True)}], {"x": ["a", "b"]})


def test_continuation_longer_than_the_context_is_a_task_error(tokenizer, model, tmp_path):
    long_doc = {"context": "Answer:", "continuation": " 3 * 14 = 42 cows." * 40}
    write_jsonl(tmp_path / "math500_bpb.jsonl", [BITS[0], long_doc])
    config = EvaluateConfig(categories={"math": ["math500_bpb"]})
    evaluator = Evaluator(config, tokenizer, "cpu", eval_data_dir=tmp_path)
    with pytest.raises(TaskError, match=r"math500_bpb\.jsonl: document 2 .* context of 128"):
        evaluator.evaluate(model)


def test_include_path_adds_user_tasks(tokenizer, model, eval_dir, tmp_path):
    data = tmp_path / "story.jsonl"
    write_jsonl(data, [{"text": "The quick brown fox jumps over the lazy dog."}] * 3)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "story.yaml").write_text(
        "task: story_ppl\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\n"
        "doc_to_target: text\n"
        "metric_list: [{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}]\n"
    )
    config = EvaluateConfig(
        categories={"general": ["story_ppl", "arc_easy"]},
        include_path=str(tmp_path / "tasks"),
        limit=2,
    )
    result = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir).evaluate(model)
    assert result["story_ppl"]["metric"] == "bits_per_byte"
    assert result["story_ppl"]["higher_is_better"] is False
    assert result["story_ppl"]["n"] == 2
    assert result["arc_easy"]["n"] == 2


def test_summarise_picks_a_preferred_metric_of_any_lm_eval_task():
    from demix.evaluate.harness import _summarise

    raw = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.1,
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": 0.2,
                "exact_match_stderr,flexible-extract": "N/A",
            },
            "grp": {"alias": "grp", "acc,none": 0.6, "acc_stderr,none": 0.05},
        },
        "higher_is_better": {"gsm8k": {"exact_match": True}, "grp": {"acc": True}},
        "n-samples": {"gsm8k": {"effective": 5}, "a": {"effective": 3}, "b": {"effective": 4}},
    }
    gsm8k = _summarise("gsm8k", raw, ["gsm8k"])
    assert gsm8k["metric"] == "exact_match,strict-match"
    assert (gsm8k["value"], gsm8k["stderr"], gsm8k["n"]) == (0.1, 0.01, 5)
    assert gsm8k["metrics"] == {
        "exact_match,strict-match": 0.1,
        "exact_match,flexible-extract": 0.2,
    }
    group = _summarise("grp", raw, ["a", "b"])
    assert (group["metric"], group["value"], group["n"], group["higher_is_better"]) == (
        "acc",
        0.6,
        7,
        True,
    )


def user_task(folder: Path, name: str, data: Path, doc_to_text: str = "{{question}}") -> str:
    """Write a one-file lm-eval task YAML (loglikelihood of " {{answer}}") into folder."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        f"doc_to_text: {json.dumps(doc_to_text)}\n"
        "doc_to_target: ' {{answer}}'\n"
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n"
    )
    return str(folder)


QUESTIONS = [
    {"question": f"Is {i} even?", "answer": "yes" if i % 2 == 0 else "no"} for i in range(4)
]


@pytest.mark.parametrize("engine", ["fast", "lm-eval"])
def test_user_task_with_a_missing_data_file_names_task_and_file(tokenizer, tmp_path, engine):
    missing = tmp_path / "nowhere" / "qa.jsonl"
    config = EvaluateConfig(
        categories={"general": ["qa"]},
        include_path=user_task(tmp_path / "tasks", "qa", missing),
        engine=engine,
    )
    with pytest.raises(TaskError) as err:
        Evaluator(config, tokenizer, "cpu")
    message = str(err.value)
    assert f"evaluation task 'qa': its data file {missing} does not exist" in message
    assert "data_files" in message and "\n" not in message


@pytest.mark.parametrize("engine", ["fast", "lm-eval"])
def test_template_errors_name_task_field_and_undefined_name(tokenizer, model, tmp_path, engine):
    data = tmp_path / "qa.jsonl"
    write_jsonl(data, QUESTIONS)
    typo = EvaluateConfig(
        categories={"general": ["qa"]},
        include_path=user_task(tmp_path / "typo", "qa", data, "Q: {{questoin}}"),
        engine=engine,
    )
    with pytest.raises(TaskError) as err:
        Evaluator(typo, tokenizer, "cpu")  # the first document is rendered when the task loads
    assert str(err.value) == (
        "evaluation task 'qa': doc_to_text fails on document 1: 'questoin' is undefined "
        "(its fields: question, answer); fix doc_to_text in its task YAML"
    )
    # A null in one document only: the fast engine renders every document when the Evaluator
    # is built, lm-eval when it scores; the error is the same.
    ragged = tmp_path / "ragged.jsonl"
    write_jsonl(ragged, [*QUESTIONS[:2], {"question": None, "answer": "no"}, QUESTIONS[3]])
    config = EvaluateConfig(
        categories={"general": ["qa"]},
        include_path=user_task(tmp_path / "ragged", "qa", ragged, "Q: {{question.strip()}}"),
        engine=engine,
    )
    with pytest.raises(TaskError) as err:
        Evaluator(config, tokenizer, "cpu").evaluate(model)
    assert str(err.value) == (
        "evaluation task 'qa': doc_to_text fails on document 3: 'None' has no attribute "
        "'strip' (its fields: question, answer); fix doc_to_text in its task YAML"
    )


def test_builtin_task_without_local_data_is_refused_offline(tokenizer, tmp_path, monkeypatch):
    import socket

    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # as under the demix CLI (conftest sets HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    connections: list = []
    monkeypatch.setattr(socket.socket, "connect", lambda s, a: connections.append(a))
    # piqa is one of lm-eval's own tasks (not a bundled demo task) with its data on the hub.
    config = EvaluateConfig(categories={"general": ["piqa"]})
    with pytest.raises(TaskError) as err:
        Evaluator(config, tokenizer, "cpu")
    message = str(err.value)
    assert message.startswith("evaluation task 'piqa': its dataset baber/piqa is not available")
    assert str(tmp_path / "cache") in message
    assert "evaluate.include_path" in message and "HF_HOME" in message and "\n" not in message
    assert connections == []


# -------------------------------------------------------------------- batch auto, eval dtype


def test_auto_batch_fits_the_free_memory_and_scores_like_a_set_batch(
    tokenizer, eval_dir, heldout_data, model, result, monkeypatch
):
    from demix import device_memory
    from demix.evaluate import batch

    assert batch.row_bytes(model, 64) == 64 * 4 * (2 * 300 + 2 * 32 * 12)  # fp32, 2 x 32 hidden
    per_row = batch.row_bytes(model, model.config.max_position_embeddings)  # a row's width
    # three rows fit in half of the free memory: auto picks 3 and keeps it for later models
    monkeypatch.setattr(device_memory, "free_memory", lambda device: (6 * per_row + 1, None))
    config = EvaluateConfig(categories=CATEGORIES, limit=LIMIT, heldout_tokens=HELDOUT_TOKENS)
    assert config.batch_size == "auto"
    auto = Evaluator(config, tokenizer, "cpu", data=heldout_data, eval_data_dir=eval_dir)
    scored = auto.evaluate(model)
    assert auto.batch_rows(model) == 3
    monkeypatch.setattr(device_memory, "free_memory", lambda device: (10**15, None))
    assert auto.batch_rows(model) == 3
    for task, value in result.items():  # the batch changes speed only
        assert scored[task]["value"] == pytest.approx(value["value"], rel=1e-5, abs=1e-6), task


def test_auto_batch_bounds(model, monkeypatch):
    from demix import device_memory
    from demix.evaluate import batch

    monkeypatch.setattr(device_memory, "free_memory", lambda device: (10**15, None))
    assert batch.auto_batch_rows(model, 64, torch.device("cpu")) == batch.AUTO_MAX_ROWS["cpu"]
    assert batch.auto_batch_rows(model, 64, torch.device("cuda")) == batch.AUTO_MAX_ROWS["cuda"]
    monkeypatch.setattr(device_memory, "free_memory", lambda device: (1, None))
    assert batch.auto_batch_rows(model, 64, torch.device("cpu")) == 1  # never 0


def test_eval_batch_size_is_a_positive_int_or_auto():
    with pytest.raises(ValueError, match="batch_size"):
        EvaluateConfig(categories=CATEGORIES, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        EvaluateConfig(categories=CATEGORIES, batch_size="big")
    assert EvaluateConfig(categories=CATEGORIES, batch_size=7).batch_size == 7


def test_a_bf16_model_scores_like_fp32_within_its_rounding(evaluator, model, result):
    """The bf16 path the GPU takes by default (evaluate.dtype auto), run on the CPU: packed
    rows with bf16 masks and log-softmax, held-out windows; continuous scores within bf16's
    rounding of fp32's, multiple choice within a near-tie per document."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    scored = evaluator.evaluate(half)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    for task, expected in result.items():
        got = scored[task]
        if expected["metric"].startswith("acc"):
            assert abs(got["value"] - expected["value"]) <= 2 / expected["n"] + 1e-9, task
        else:
            assert got["value"] == pytest.approx(expected["value"], rel=0.02), task
