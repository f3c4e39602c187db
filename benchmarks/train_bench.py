"""Training throughput: the demix training loop vs a bare torch loop, tokens/s in one run.

The bare loop is forward, cross-entropy, backward and an AdamW step on pre-made random batches,
nothing else. The demix loop is `demix.train.train_model` as every stage runs it (mixture
sampling from the packed shards, LR schedule, gradient clipping, NaN check, progress, periodic
checkpoints at the config's interval). Same model (the demo's Llama shape unless overridden),
same batch and sequence length, same number of steps, alternating runs, medians.
Goal: demix / bare >= 0.9.

Then the same loop in several processes: `demix train --processes N` (accelerate launch; DDP
over gloo on CPU, each process one thread of the cores), same global batch, against the one
process above (all cores); tokens/s is global tokens over the loop's own clock, so process
start and the final save are not counted.

--device and --dtype set train.device and train.dtype (default auto: CUDA with bf16 autocast
when present, else the CPU in fp32); the bare loop autocasts alike. --json writes the medians.

Usage: python benchmarks/train_bench.py [--hidden 128 --layers 2 --steps 120 --repeats 3
                                         --processes 2 --device auto --dtype auto --json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from demix.config import ArchitectureConfig, config_yaml, parse_config
from demix.data.shards import CuratedData
from demix.model import build_tiny_llama, resolve_device, resolve_dtype, set_threads
from demix.stages import curate_stage
from demix.train import train_model

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "be", "fi"]


def synthetic_corpus(folder: Path, names: list[str], docs: int, seed: int = 0) -> None:
    """Three jsonl datasets of pseudo-words (each with its own word distribution)."""
    rng = random.Random(seed)
    for k, name in enumerate(names):
        words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(400)]
        weights = [1.0 / (i + 1 + 10 * k) for i in range(len(words))]
        with open(folder / f"{name}.jsonl", "w") as f:
            for _ in range(docs):
                text = " ".join(rng.choices(words, weights, k=rng.randint(80, 200)))
                f.write(json.dumps({"text": text}) + "\n")


def bench_config(
    folder: Path,
    arch: ArchitectureConfig,
    seq_len: int,
    batch: int,
    steps: int,
    device: str = "auto",
    dtype: str = "auto",
    docs: int = 3000,
):
    names = ["general", "code", "math"]
    synthetic_corpus(folder, names, docs=docs)
    tokens = steps * seq_len * batch
    return parse_config(
        {
            "data": {
                "datasets": [{"name": n, "paths": [str(folder / f"{n}.jsonl")]} for n in names],
                "general": "general",
                "tokenizer": {"vocab_size": 4096},
            },
            "model": {"architecture": arch.model_dump()},
            "train": {
                "seq_len": seq_len,
                "batch_size": batch,
                "device": device,
                "dtype": dtype,
                "base": {"tokens": tokens, "lr": 3e-3},
                "component": {"tokens": tokens},
                "final": {"tokens": tokens},
            },
            "evaluate": {"categories": {"general": ["heldout:general"]}},
        }
    )


def demix_loop(config, data: CuratedData, out: Path, run: int) -> float:
    """tokens/s of train_model (the loop's own clock: no model build, no final save)."""
    manifest = train_model(
        out / f"demix-{run}",
        data,
        dict(data.token_prior),
        config.train.base,
        config.train,
        config.model,
        seed=run,
        role="base",
        name=f"bench-{run}",
        arch=config.model.architecture,
        quiet=True,
    )
    return float(manifest["tokens_per_s"])


def launched_loop(config, data: CuratedData, out: Path, run: int, processes: int) -> float:
    """tokens/s (global) of `demix train --role base --processes N`, from its manifest."""
    raw = yaml.safe_load(config_yaml(config))
    raw["seed"] = 1000 + run  # a new job each run (a finished one would be skipped)
    path = out / f"launched-{run}.yaml"
    path.write_text(yaml.safe_dump(raw))
    model = out / f"launched-{run}"
    argv = ["train", str(path), "--role", "base", "--data", str(data.root), "--out", str(model)]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "demix.cli", *argv, "--processes", str(processes)]
    subprocess.run(cmd, check=True, cwd=root, env=env, capture_output=True)
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["processes"] == processes
    return float(manifest["tokens_per_s"])


def bare_loop(config, data: CuratedData, run: int) -> float:
    """tokens/s of forward + backward + AdamW on random batches of the same shape (under bf16
    autocast when train.dtype resolves to bfloat16, as the demix loop)."""
    device = resolve_device(config.train.device)
    autocast = resolve_dtype(config.train.dtype, device) == torch.bfloat16
    model = build_tiny_llama(config.model.architecture, data.vocab_size, data.eos_token_id, run)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, foreach=True)
    train = config.train
    steps = config.train.base.tokens // train.tokens_per_step
    rng = np.random.default_rng(run)
    batches = [
        torch.from_numpy(rng.integers(0, data.vocab_size, (train.batch_size, train.seq_len + 1)))
        for _ in range(steps)
    ]
    start = time.perf_counter()
    for batch in batches:
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * train.batch_size * train.seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--processes", type=int, default=2, help="processes of the launched runs (0: skip them)"
    )
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu, cuda")
    parser.add_argument("--dtype", default="auto", help="train.dtype: auto, float32, bfloat16")
    parser.add_argument("--docs", type=int, default=3000, help="documents per synthetic dataset")
    parser.add_argument("--json", type=Path, help="write the medians to this file")
    args = parser.parse_args()
    set_threads()
    arch = ArchitectureConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 32),
        intermediate_size=args.hidden * 3,
        max_position_embeddings=max(256, args.seq_len),
    )
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp).resolve()
        config = bench_config(
            root, arch, args.seq_len, args.batch, args.steps, args.device, args.dtype, args.docs
        )
        data = curate_stage(config, root / "dataset")
        device = resolve_device(config.train.device)
        bare_loop(config, data, 99)  # warm-up: allocator, kernels
        ours, bare, launched = [], [], []
        for run in range(args.repeats):
            ours.append(demix_loop(config, data, root, run))
            bare.append(bare_loop(config, data, run))
            if args.processes > 1:
                launched.append(launched_loop(config, data, root, run, args.processes))
        n_params = sum(
            p.numel() for p in build_tiny_llama(arch, data.vocab_size, 0, 0).parameters()
        )
        ours_s, bare_s = statistics.median(ours), statistics.median(bare)
        dtype = resolve_dtype(config.train.dtype, device)
        if args.json:
            record = {"device": device.type, "dtype": str(dtype), "bare": bare_s, "demix": ours_s}
            args.json.write_text(json.dumps(record))
        print(
            f"model: {n_params / 1e6:.2f}M params, batch {args.batch} x seq {args.seq_len}, "
            f"{args.steps} steps, {device.type} {str(dtype).removeprefix('torch.')}, "
            f"{torch.get_num_threads()} threads, "
            f"median of {args.repeats}"
        )
        print(f"{'loop':44s} {'tokens/s':>10s} {'ratio':>7s}  goal")
        print(f"{'bare torch (fwd, bwd, AdamW)':44s} {bare_s:>10,.0f} {1:>6.2f}x")
        print(f"{'demix train_model':44s} {ours_s:>10,.0f} {ours_s / bare_s:>6.2f}x  >= 0.9x")
        if launched:
            many = statistics.median(launched)
            label = f"demix, {args.processes} processes (accelerate launch)"
            print(f"{label:44s} {many:>10,.0f} {many / bare_s:>6.2f}x")
            ratio = f"{args.processes} processes / 1 process, same global batch"
            print(f"{ratio:44s} {'':>10s} {many / ours_s:>6.2f}x")


if __name__ == "__main__":
    main()
