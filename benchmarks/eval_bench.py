"""Proxy evaluation benchmark: ratios measured in one run, medians of interleaved repeats.

Same model, same tasks (the eight bundled demo tasks), same documents (the first --limit of each):
1. lm-eval: `lm_eval.evaluator.evaluate` per proxy with the tasks prebuilt (TaskManager.load once,
   HFLM built once) / the fast engine (`FastScorer.evaluate`, requests built once). Goal >= 3x.
2. fast engine / the floor: the model's forward passes over exactly the tokens the fast engine
   reads (the same batches and attention kernel, masks prebuilt, logits only where a token is
   scored), nothing else. Everything the engine adds (log-softmax, gathers, lm-eval's
   process_results and aggregation) is the difference. Goal <= 1.3x.
3. the same on CUDA when a GPU is present (skipped otherwise).
Both engines' metrics are compared in the same run (accuracy exactly, the rest relative).

The model is the demo's shape (configs/demo.yaml: hidden 128, 2 layers, 4 heads, context 256)
with random weights, configured with eager attention (the demo's setting) and, as a second row,
with SDPA: lm-eval runs the attention the model is configured with, the fast engine always runs
SDPA when the model supports it. The tokenizer is a 4096-token BPE trained on the demo corpus.
--device cpu or cuda runs one device only (default: the CPU, and CUDA when present); --synthetic
scores a small generated corpus and task set instead of the demo's (no download; what the CPU
dry run of benchmarks/gpu_check.sh uses); --no-fetch takes --data as it is; --json writes the rows.
Usage: python benchmarks/eval_bench.py [--data data/demo] [--limit 60] [--repeats 5]
                                       [--device auto|cpu|cuda --synthetic --no-fetch --json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from demix.config import ArchitectureConfig
from demix.data.demo import fetch_demo
from demix.data.tokenizer import train_tokenizer
from demix.evaluate.fast import FastScorer
from demix.evaluate.packing import packing_attention
from demix.evaluate.suite import BUNDLED_TASKS, RANKED_CHOICE, load_task_suite
from demix.model import build_tiny_llama

DEMO_ARCH = ArchitectureConfig(
    hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384, max_position_embeddings=256
)
BOOTSTRAP_ITERS = 1000


def demo_tokenizer(data: Path, documents: int):
    """The demo's tokenizer recipe (byte-level BPE, 4096 tokens) on the first documents per domain."""
    texts = []
    for name in ("general", "code", "math"):
        with open(data / f"{name}.jsonl", encoding="utf-8") as f:
            for _, line in zip(range(documents), f, strict=False):
                texts.append(json.loads(line)["text"])
    return train_tokenizer(texts, 4096)


def synthetic_data(folder: Path, documents: int = 40, seed: int = 0) -> Path:
    """A small corpus (general, code, math) and every bundled task's file, generated: the
    engines' timings and agreement need no real data."""
    rng = random.Random(seed)
    words = "the a river city council report people year market school north long small".split()
    eval_dir = folder / "eval"
    eval_dir.mkdir(parents=True)

    def sentence() -> str:
        return " ".join(rng.choices(words, k=rng.randint(6, 14))).capitalize() + "."

    def sums() -> tuple[int, int]:
        return rng.randint(2, 99), rng.randint(2, 99)

    texts = {
        "general": [" ".join(sentence() for _ in range(6)) for _ in range(documents)],
        "code": [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(documents)],
        "math": [
            f"{a} + {b} = {a + b}. The answer is {a + b}."
            for a, b in (sums() for _ in range(documents))
        ],
    }
    for name, docs in texts.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    for task, kind in BUNDLED_TASKS.items():
        records = []
        for _ in range(documents):
            a, b = sums()
            if kind == RANKED_CHOICE:
                choices = [str(a + b), str(a * b), str(abs(a - b))]
                records.append(
                    {"query": f"Question: {a} plus {b}?\nAnswer:", "choices": choices, "gold": 0}
                )
            else:
                records.append({"context": sentence(), "continuation": " " + sentence()})
        (eval_dir / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict:
    """Median seconds of each function, run in turn `repeats` times after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def metric_differences(reference: dict, fast: dict) -> tuple[int, float]:
    """(accuracies that differ, largest relative difference of the other metrics)."""
    accuracy_mismatches, largest = 0, 0.0
    for task, metrics in reference["results"].items():
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, float):
                continue
            other = fast["results"][task][key]
            if key.startswith("acc"):
                accuracy_mismatches += value != other
            elif math.isfinite(value):
                largest = max(largest, abs(other - value) / max(abs(value), 1e-12))
    return accuracy_mismatches, largest


def bench(device: str, attention: str, tokenizer, data: Path, args) -> dict:
    """Build both engines for one device and configured attention, time them; medians and checks."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    model = build_tiny_llama(DEMO_ARCH, len(tokenizer), tokenizer.eos_token_id, seed=0)
    model.set_attn_implementation(attention)
    model.to(device).eval()
    max_length = DEMO_ARCH.max_position_embeddings
    with tempfile.TemporaryDirectory() as tmp:
        names = list(BUNDLED_TASKS)
        eval_dir = data / "eval"
        reference_suite = load_task_suite(names, Path(tmp) / "a", eval_data_dir=eval_dir)
        fast_suite = load_task_suite(names, Path(tmp) / "b", eval_data_dir=eval_dir)
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            device=device,
            batch_size=args.batch_size,
            max_length=max_length,
        )
        start = time.perf_counter()
        scorer = FastScorer(
            fast_suite.task_dict["tasks"],
            fast_suite.task_dict["groups"],
            limit=args.limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
        plan = scorer.token_plan(model, tokenizer, device, max_length, args.batch_size).plan
        build_seconds = time.perf_counter() - start
        parameter = next(model.parameters())
        with packing_attention(model) as kernel:
            masks = list(plan.masks(kernel, parameter.dtype, parameter.device))
        inputs = [
            {
                "input_ids": b.input_ids.to(device),
                "attention_mask": mask,
                "position_ids": b.position_ids.to(device),
                "logits_to_keep": b.kept.to(device),
                "use_cache": False,
            }
            for b, mask in zip(plan.batches, masks, strict=True)
        ]
        outputs: dict[str, Any] = {}

        def lm_eval_run() -> None:
            outputs["lm-eval"] = evaluate(
                lm=lm,
                task_dict=reference_suite.task_dict,
                limit=args.limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=True,
            )

        def fast_run() -> None:
            outputs["fast"] = scorer.evaluate(model, tokenizer, device, max_length, args.batch_size)

        def floor_run() -> None:
            with packing_attention(model):
                for batch in inputs:
                    model(**batch)

        with torch.no_grad():
            times = interleaved_medians(
                {"lm-eval": lm_eval_run, "fast": fast_run, "floor": floor_run},
                args.repeats,
                device,
            )
        mismatches, largest = metric_differences(outputs["lm-eval"], outputs["fast"])
        documents = sum(scorer.documents.values())
    return {
        **times,
        "build": build_seconds,
        "documents": documents,
        "tokens": plan.tokens,
        "batches": len(plan.batches),
        "accuracy_mismatches": mismatches,
        "largest_relative": largest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--tokenizer-documents", type=int, default=2000)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--synthetic", action="store_true", help="generated data, no download")
    parser.add_argument("--no-fetch", action="store_true", help="use --data as it is")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            args.data = synthetic_data(Path(tmp) / "data")
        elif not args.no_fetch:
            fetch_demo(args.data)
        tokenizer = demo_tokenizer(args.data, args.tokenizer_documents)
        if args.device == "auto":
            devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
        else:
            devices = [args.device]
        rows = {
            (device, attention): bench(device, attention, tokenizer, args.data, args)
            for device in devices
            for attention in args.attention
        }
    if args.json:
        named = [{"device": d, "attention": a, **row} for (d, a), row in rows.items()]
        args.json.write_text(json.dumps(named, indent=1))

    first = next(iter(rows.values()))
    print(
        "model: demo shape (hidden 128, 2 layers, context 256, random weights), fp32; "
        f"{len(BUNDLED_TASKS)} bundled tasks{' (synthetic data)' if args.synthetic else ''}, {first['documents']} documents (limit {args.limit}); "
        f"batch size {args.batch_size}; {torch.get_num_threads()} CPU threads; "
        f"median of {args.repeats}"
    )
    print(
        f"fast engine: {first['tokens']} tokens in {first['batches']} batches; requests built "
        f"once in {first['build']:.2f} s"
    )
    header = (
        f"{'device':<8}{'model attention':<17}{'lm-eval s':>10}{'fast s':>9}{'floor s':>9}"
        f"{'lm-eval/fast':>14}{'fast/floor':>12}{'acc diffs':>11}{'max rel diff':>14}"
    )
    print(header)
    for (device, attention), row in rows.items():
        print(
            f"{device:<8}{attention:<17}{row['lm-eval']:>10.3f}{row['fast']:>9.3f}"
            f"{row['floor']:>9.3f}{row['lm-eval'] / row['fast']:>14.2f}"
            f"{row['fast'] / row['floor']:>12.2f}{row['accuracy_mismatches']:>11d}"
            f"{row['largest_relative']:>14.1e}"
        )
    if args.device == "auto" and "cuda" not in devices:
        print(f"{'cuda':<8}skipped (no CUDA device)")
    print("goals: lm-eval/fast >= 3, fast/floor <= 1.3, acc diffs 0, max rel diff <= 1e-5")


if __name__ == "__main__":
    main()
