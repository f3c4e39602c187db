"""On CUDA (skipped without a GPU): training, proxies and evaluation agree with the CPU.

The DeltaStack proxy build on CUDA is checked against the CPU in tests/test_merge_methods.py
(`test_cuda_proxies_equal_cpu`); `pytest -m gpu` runs all of them.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from demix.config import EvaluateConfig, parse_config
from demix.data.curate import curate
from demix.data.shards import CuratedData
from demix.evaluate import Evaluator
from demix.train import train_model

from .conftest import smoke_config_dict
from .test_fast_eval import models, suite_dirs, tokenizer  # noqa: F401 (fixtures)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _train(config, data, out, device: str, dtype: str) -> list[dict]:
    train = config.train.model_copy(update={"device": device, "dtype": dtype})
    stage = config.train.base.model_copy(update={"tokens": 256 * 24})
    train_model(
        out,
        data,
        data.token_prior,
        stage,
        train,
        config.model,
        config.seed,
        role="base",
        name="base",
        arch=config.model.architecture,
        quiet=True,
    )
    return json.loads((out / "training_log.json").read_text())


def test_bf16_training_on_cuda_follows_the_fp32_cpu_run(corpus_dir, tmp_path):
    """Same data, seed and initial weights: bf16 autocast on the GPU tracks the fp32 CPU loss."""
    config = parse_config(smoke_config_dict(corpus_dir))
    curate(config.data, tmp_path / "data", config.seed)
    data = CuratedData(tmp_path / "data")
    cpu = _train(config, data, tmp_path / "cpu", "cpu", "float32")
    gpu = _train(config, data, tmp_path / "gpu", "cuda", "bfloat16")
    assert [r["step"] for r in cpu] == [r["step"] for r in gpu]
    for a, b in zip(cpu, gpu, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.03), (a, b)
    assert gpu[-1]["loss"] < gpu[0]["loss"]


@pytest.mark.parametrize("model_name", ["eager", "sdpa-gqa"])
def test_fast_eval_on_cuda_equals_cpu(model_name, models, tokenizer, suite_dirs):  # noqa: F811
    """The packed fast engine on the GPU gives the CPU's numbers (fp32 on both)."""
    eval_dir, include = suite_dirs
    from demix.evaluate import BUNDLED_TASKS

    config = EvaluateConfig(
        categories={"all": list(BUNDLED_TASKS)},
        engine="fast",
        batch_size=3,
        include_path=str(include),
    )
    cpu_model = models[model_name]
    gpu_model = copy.deepcopy(cpu_model).to("cuda")
    cpu = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir).evaluate(cpu_model)
    gpu = Evaluator(config, tokenizer, "cuda", eval_data_dir=eval_dir).evaluate(gpu_model)
    assert list(gpu) == list(cpu)
    for task, expected in cpu.items():
        got = gpu[task]
        for metric, value in expected["metrics"].items():
            if metric.startswith("acc"):  # a near-tie may flip one document
                assert abs(got["metrics"][metric] - value) <= 1 / expected["n"] + 1e-9
            else:
                assert got["metrics"][metric] == pytest.approx(value, rel=1e-4), (task, metric)


def test_evaluation_on_cuda_defaults_to_bf16_sdpa_and_an_auto_batch(
    models,  # noqa: F811
    tokenizer,  # noqa: F811
    suite_dirs,  # noqa: F811
    caplog,
):
    """evaluate.dtype and batch_size auto on the GPU: a bf16 model under SDPA, the batch from
    the free memory (logged), and the fp32 CPU's numbers within bf16's rounding."""
    import logging

    from demix.evaluate import BUNDLED_TASKS
    from demix.model import resolve_dtype

    eval_dir, include = suite_dirs
    config = EvaluateConfig(
        categories={"all": list(BUNDLED_TASKS)}, engine="fast", include_path=str(include)
    )
    cpu_model = models["sdpa-gqa"]
    dtype = resolve_dtype(config.dtype, torch.device("cuda"))
    assert dtype == torch.bfloat16
    gpu_model = copy.deepcopy(cpu_model).to("cuda", dtype)
    cpu = Evaluator(config, tokenizer, "cpu", eval_data_dir=eval_dir).evaluate(cpu_model)
    evaluator = Evaluator(config, tokenizer, "cuda", eval_data_dir=eval_dir)
    with caplog.at_level(logging.INFO, logger="demix"):
        gpu = evaluator.evaluate(gpu_model)
    assert evaluator.batch_rows(gpu_model) > 1
    assert any("evaluation batch:" in r.getMessage() for r in caplog.records)
    for task, expected in cpu.items():
        if expected["metric"] in ("bits_per_byte", "loss"):
            assert gpu[task]["value"] == pytest.approx(expected["value"], rel=0.02), task
