"""Merge engine benchmark: ratios measured in one run on synthetic Llama-shaped checkpoints.

1. in-place proxy build (DeltaStack.write) / the memory-traffic floor: (K + 1) tensors read and
   one written, at the bandwidth of a plain copy measured in the same run;
2. streaming disk merge (demix) vs `mergekit-yaml` (linear, same inputs, same output dtype),
   wall time (skipped when mergekit is not installed: `pip install mergekit==0.1.5`);
3. peak RSS of the streaming disk merge for K = 2 and K = 7, each in a fresh process;
4. the in-place proxy on CUDA when a GPU is present.

Components are the base plus small noise (the regime DeMix assumes).
Usage: python benchmarks/merge_bench.py [--hidden 768 --layers 12 --vocab 32000 --components 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from demix.config import ArchitectureConfig
from demix.merge import DeltaStack
from demix.model import build_tiny_llama, load_model


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_checkpoints(
    root: Path, arch: ArchitectureConfig, vocab: int, k: int
) -> tuple[Path, list[Path]]:
    """The base and k components = base + N(0, 1e-3) noise, saved as HF folders."""
    model = build_tiny_llama(arch, vocab, 0, seed=0)
    model.save_pretrained(root / "base")
    base_state = {name: p.detach().clone() for name, p in model.named_parameters()}
    comps = []
    for i in range(k):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + torch.randn(p.shape, generator=gen) * 1e-3)
        model.save_pretrained(root / f"c{i}")
        comps.append(root / f"c{i}")
    return root / "base", comps


def in_place_vs_floor(base: Path, comps: list[Path], device: str, repeats: int) -> dict:
    model = load_model(base, device)
    stack = DeltaStack(model, base, comps)
    weights = np.full(len(comps), 1.0 / len(comps))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    dst = torch.empty_like(flat)
    t_copy = median_time(lambda: dst.copy_(flat), repeats)
    t_place = median_time(lambda: stack.write(weights), repeats)
    floor = t_copy * (len(comps) + 2) / 2  # K deltas + base read, one model written
    return {"copy_s": t_copy, "floor_s": floor, "in_place_s": t_place, "ratio": t_place / floor}


def peak_rss_of_merge(base: Path, comps: list[Path], out: Path) -> tuple[float, float]:
    """(wall s, peak RSS MiB) of a streaming merge in a fresh process."""
    # VmHWM of the fresh process, not ru_maxrss: that one keeps the parent's high-water mark
    # across the fork.
    code = (
        "import json, time; from demix.merge import merge_to_disk; t = time.perf_counter();"
        f"merge_to_disk({str(base)!r}, {[str(c) for c in comps]!r}, [1 / {len(comps)}] * {len(comps)}, {str(out)!r});"
        "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'));"
        "print(json.dumps([time.perf_counter() - t, hwm / 1024]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    wall, rss = json.loads(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return wall, rss


def mergekit_wall(base: Path, comps: list[Path], out: Path) -> float | None:
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    if not Path(exe).exists():
        return None
    config = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": str(c), "parameters": {"weight": 1 / len(comps)}} for c in comps],
        "parameters": {"normalize": False},
    }
    path = out.with_suffix(".yaml")
    path.write_text(json.dumps(config))
    start = time.perf_counter()
    subprocess.run(
        [exe, str(path), str(out), "--copy-tokenizer", "--lazy-unpickle"],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--components", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    arch = ArchitectureConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        intermediate_size=args.hidden * 8 // 3,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        base, comps = make_checkpoints(root, arch, args.vocab, args.components)
        n_params = sum(p.numel() for p in load_model(base).parameters())
        print(
            f"model: {n_params / 1e6:.0f}M params fp32, K = {args.components}, {torch.get_num_threads()} threads"
        )
        cpu = in_place_vs_floor(base, comps, "cpu", args.repeats)
        print(
            f"1. in-place proxy {cpu['in_place_s']:.4f} s; floor {cpu['floor_s']:.4f} s "
            f"(copy {cpu['copy_s']:.4f} s x (K+2)/2) -> {cpu['ratio']:.2f}x the floor (goal <= 1.5x)"
        )
        wall, _ = peak_rss_of_merge(base, comps, root / "merged")
        mk = mergekit_wall(base, comps, root / "mergekit")
        if mk is None:
            print(
                f"2. streaming disk merge {wall:.2f} s; mergekit-yaml not installed (pip install mergekit==0.1.5)"
            )
        else:
            print(
                f"2. streaming disk merge {wall:.2f} s vs mergekit-yaml {mk:.2f} s -> {mk / wall:.2f}x (goal >= 3x)"
            )
        _, rss2 = peak_rss_of_merge(base, comps[:2], root / "merged2")
        _, rss7 = peak_rss_of_merge(base, comps, root / "merged7")
        print(
            f"3. peak RSS of the streaming merge: K=2 {rss2:.0f} MiB, K={len(comps)} {rss7:.0f} MiB "
            f"-> ratio {rss7 / rss2:.2f} (goal <= 1.2)"
        )
        if torch.cuda.is_available():
            gpu = in_place_vs_floor(base, comps, "cuda", args.repeats)
            print(
                f"4. CUDA ({torch.cuda.get_device_name()}): in-place proxy {gpu['in_place_s'] * 1e3:.2f} ms, "
                f"{gpu['ratio']:.2f}x the copy floor"
            )
        else:
            print("4. CUDA: no GPU here, skipped")


if __name__ == "__main__":
    main()
