"""Merge engine benchmark: ratios measured in one run on synthetic Llama-shaped checkpoints.

1. in-place proxy build (DeltaStack.write) / the memory-traffic floor: (K + 1) tensors read and
   one written, at the bandwidth of a plain copy measured in the same run;
2. streaming disk merge (demix) vs `mergekit-yaml` (linear, same inputs, same output dtype, its
   --num-threads set to torch's), wall time of the whole command, medians of alternating runs
   with dirty pages flushed before each (skipped when mergekit is not installed: it is in the
   dev extra); fp32 checkpoints, then the same checkpoints in bf16 merged to bf16;
3. peak RSS of the streaming disk merge for K = 2 and K = 7, each in a fresh process;
4. the in-place proxy on CUDA when a GPU is present.
With --host-deltas, also proxies built from host-resident deltas (merge.delta_device: host)
against their floor: the base and K deltas copied from page-locked host memory to the device, at
the bandwidth of one such copy measured in the same run. With --device cpu or cuda only the
in-place rows run, on that device (what benchmarks/gpu_check.sh uses); --json writes them.

Components are the base plus small noise (the regime DeMix assumes).
Usage: python benchmarks/merge_bench.py [--hidden 768 --layers 12 --vocab 32000 --components 7]
                                        [--device auto|cpu|cuda --host-deltas --json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
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
from demix.device_memory import free_memory
from demix.merge import DeltaStack
from demix.model import build_tiny_llama, load_model

# in-place proxy timings per method (linear has the goal; the others are for reference)
METHODS_TIMED = ("linear", "ties", "dare_ties")


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


def in_place_vs_floor(
    base: Path,
    comps: list[Path],
    device: str,
    repeats: int,
    methods: tuple[str, ...],
    delta_device: str = "device",
    delta_dtype: torch.dtype = torch.float32,
) -> dict:
    """In-place proxy time per merge method against the copy floor of the same bytes.

    With the deltas on the device the floor is a copy on the device of the bytes a proxy build
    reads and writes (the base and K deltas read, the proxy written); with host deltas, a copy
    from page-locked host memory to the device of the base and the K deltas.
    Memory bandwidth on a shared machine drifts by 2x within seconds, so each repeat times the
    copy and the proxy back to back; the ratio reported is the median of the per-repeat ratios.
    """
    model = load_model(base, device)
    weights = np.full(len(comps), 1.0 / len(comps))
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    proxy_bytes = flat.numel() * flat.element_size()
    delta_bytes = len(comps) * flat.numel() * delta_dtype.itemsize
    if delta_device == "host":
        src = torch.empty_like(flat, device="cpu", pin_memory=device == "cuda")
        scale = (proxy_bytes + delta_bytes) / proxy_bytes  # base + K deltas, one copy moves 1
        bandwidth = proxy_bytes  # bytes per copy: a transfer's bytes
    else:
        src = flat
        scale = (2 * proxy_bytes + delta_bytes) / (2 * proxy_bytes)  # a copy moves 2
        bandwidth = 2 * proxy_bytes  # a copy's memory traffic
    dst = torch.empty_like(flat)

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    out = {"floor_s": [], "times": {}, "ratios": {}}
    for method in methods:
        stack = DeltaStack(
            model, base, comps, method, delta_dtype=delta_dtype, delta_device=delta_device
        )
        stack.write(weights)
        dst.copy_(src, non_blocking=True)
        floors, times = [], []
        for _ in range(repeats):
            floors.append(timed(lambda: dst.copy_(src, non_blocking=True)) * scale)
            times.append(timed(lambda stack=stack: stack.write(weights)))
        out["floor_s"] += floors
        out["times"][method] = statistics.median(times)
        out["ratios"][method] = statistics.median(t / f for t, f in zip(times, floors, strict=True))
        del stack
    out["floor_s"] = statistics.median(out["floor_s"])
    out["bandwidth"] = bandwidth * scale / out["floor_s"]  # bytes (or traffic) per s of one copy
    return out


def in_place_rows(row, base, comps, device: str, args) -> dict:
    """The in-place proxy rows on one device (device and, with --host-deltas, host deltas)."""
    dtype = getattr(torch, args.delta_dtype)
    label = f"{device} ({torch.cuda.get_device_name()})" if device == "cuda" else device
    timings = {
        "device": in_place_vs_floor(
            base, comps, device, args.repeats, METHODS_TIMED, "device", dtype
        )
    }
    row(
        f"floor on {label}: device copy of the bytes read and written",
        f"{timings['device']['floor_s'] * 1e3:.3f} ms",
        "1.00x",
        f"{timings['device']['bandwidth'] / 1e9:.1f} GB/s",
    )
    for method, seconds in timings["device"]["times"].items():
        goal = "<= 1.3x" if method == "linear" else ""
        row(
            f"   in-place proxy, {method}",
            f"{seconds * 1e3:.3f} ms",
            f"{timings['device']['ratios'][method]:.2f}x",
            goal,
        )
    if args.host_deltas:
        host = in_place_vs_floor(base, comps, device, args.repeats, METHODS_TIMED, "host", dtype)
        timings["host"] = host
        row(
            "floor: host-to-device copy of the base and K deltas",
            f"{host['floor_s'] * 1e3:.3f} ms",
            "1.00x",
            f"{host['bandwidth'] / 1e9:.1f} GB/s",
        )
        for method, seconds in host["times"].items():
            goal = "<= 1.3x" if method == "linear" else ""
            row(
                f"   host-streamed proxy, {method}",
                f"{seconds * 1e3:.3f} ms",
                f"{host['ratios'][method]:.2f}x",
                goal,
            )
    return timings


def _drop_caches_of_writes() -> None:
    """Flush dirty pages so one merge's writeback does not slow the next one down."""
    os.sync()


def bf16_copies(folders: list[Path], root: Path) -> list[Path]:
    """The same checkpoints stored in bf16 (how most LLM checkpoints are shared)."""
    from safetensors.torch import load_file, save_file

    copies = []
    for folder in folders:
        copy = root / f"{folder.name}-bf16"
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.safetensors"))
        tensors = load_file(folder / "model.safetensors")
        save_file(
            {k: v.to(torch.bfloat16) for k, v in tensors.items()},
            copy / "model.safetensors",
            metadata={"format": "pt"},
        )
        copies.append(copy)
    return copies


def demix_merge_wall(
    base: Path, comps: list[Path], out: Path, method: str = "linear"
) -> tuple[float, float]:
    """(wall s of the whole process, imports included, like mergekit-yaml's; peak RSS MiB) of a
    demix streaming merge in a fresh process."""
    # VmHWM of the fresh process, not ru_maxrss: that one keeps the parent's high-water mark
    # across the fork.
    code = (
        "from demix.merge import merge_to_disk;"
        f"merge_to_disk({str(base)!r}, {[str(c) for c in comps]!r}, [1 / {len(comps)}] * {len(comps)}, {str(out)!r}, method={method!r});"
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    )
    _drop_caches_of_writes()
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    rss_kib = int(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return wall, rss_kib / 1024


def mergekit_yaml() -> str | None:
    exe = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    return exe if Path(exe).exists() else None


def mergekit_wall(
    exe: str, comps: list[Path], out: Path, threads: int, dtype: str = "float32"
) -> float:
    """Wall time of `mergekit-yaml` (linear, the same weights), process start included."""
    config = {
        "merge_method": "linear",
        "dtype": dtype,
        "models": [{"model": str(c), "parameters": {"weight": 1 / len(comps)}} for c in comps],
        "parameters": {"normalize": False},
    }
    path = out.with_suffix(".yaml")
    path.write_text(json.dumps(config))
    _drop_caches_of_writes()
    start = time.perf_counter()
    result = subprocess.run(
        [exe, str(path), str(out), "--no-copy-tokenizer", "--num-threads", str(threads)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"mergekit-yaml failed: {result.stderr.strip().splitlines()[-1:]}")
    shutil.rmtree(out, ignore_errors=True)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--components", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--disk-repeats", type=int, default=3)
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: every row on the CPU, the in-place rows on CUDA too when a GPU is present; "
        "cpu or cuda: only the in-place rows, on that device",
    )
    parser.add_argument(
        "--host-deltas", action="store_true", help="also time proxies from host-resident deltas"
    )
    parser.add_argument("--delta-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", type=Path, help="write the in-place timings to this file")
    args = parser.parse_args()
    arch = ArchitectureConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        intermediate_size=args.hidden * 8 // 3,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp).resolve()  # mergekit takes a relative path for a Hub repo id
        base, comps = make_checkpoints(root, arch, args.vocab, args.components)
        n_params = sum(p.numel() for p in load_model(base).parameters())
        k = len(comps)
        print(f"model: {n_params / 1e6:.0f}M params fp32, K = {k} components, {threads} threads")
        print(f"{'measurement':58s} {'median':>10s} {'ratio':>8s}  goal")

        def row(label: str, seconds: str, ratio: str, goal: str = "") -> None:
            print(f"{label:58s} {seconds:>10s} {ratio:>8s}  {goal}")

        if args.device != "auto":
            free = free_memory(args.device)[0]  # before this bench holds any of it
            timings = in_place_rows(row, base, comps, args.device, args)
            if args.json:
                name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
                record = {"device": args.device, "name": name, "params": n_params, "k": k}
                record["free_bytes"] = free
                args.json.write_text(json.dumps({**record, **timings}, indent=1))
            return

        dtype = getattr(torch, args.delta_dtype)
        cpu = in_place_vs_floor(base, comps, "cpu", args.repeats, METHODS_TIMED, "device", dtype)
        row("1. floor: copy of (K+2)/2 models' bytes", f"{cpu['floor_s']:.4f} s", "1.00x")
        for method, seconds in cpu["times"].items():
            goal = "<= 1.5x" if method == "linear" else ""
            row(
                f"   in-place proxy, {method}",
                f"{seconds:.4f} s",
                f"{cpu['ratios'][method]:.2f}x",
                goal,
            )
        if args.host_deltas:
            host = in_place_vs_floor(base, comps, "cpu", args.repeats, METHODS_TIMED, "host", dtype)
            row("   floor: copy of the base and K deltas", f"{host['floor_s']:.4f} s", "1.00x")
            for method, seconds in host["times"].items():
                row(
                    f"   host-streamed proxy, {method}",
                    f"{seconds:.4f} s",
                    f"{host['ratios'][method]:.2f}x",
                )

        exe = mergekit_yaml()
        bf16 = bf16_copies([base, *comps], root)
        for label, (b, cs, dtype) in {
            "2. streaming disk merge, demix (linear, fp32, whole process)": (
                base,
                comps,
                "float32",
            ),
            "   the same checkpoints in bf16, merged to bf16": (bf16[0], bf16[1:], "bfloat16"),
        }.items():
            ours, theirs = [], []
            for _ in range(args.disk_repeats):  # alternate the two so drift hits both
                ours.append(demix_merge_wall(b, cs, root / "merged")[0])
                if exe:
                    theirs.append(mergekit_wall(exe, cs, root / "mergekit", threads, dtype))
            wall = statistics.median(ours)
            row(label, f"{wall:.2f} s", "1.00x")
            if theirs:
                mk = statistics.median(theirs)
                row(
                    f"   mergekit-yaml (linear, {dtype}, -j {threads})",
                    f"{mk:.2f} s",
                    f"{mk / wall:.2f}x",
                    ">= 3x",
                )
            else:
                row("   mergekit-yaml: not installed (pip install mergekit==0.1.5)", "-", "-")

        _, rss2 = demix_merge_wall(base, comps[:2], root / "merged2")
        _, rss7 = demix_merge_wall(base, comps, root / "merged7")
        row("3. peak RSS of the streaming merge, K = 2", f"{rss2:.0f} MiB", "1.00x")
        row(
            f"   peak RSS of the streaming merge, K = {k}",
            f"{rss7:.0f} MiB",
            f"{rss7 / rss2:.2f}x",
            "<= 1.2x",
        )
        largest = max(p.numel() for p in load_model(base).parameters()) * 4 / 2**20
        _, ties2 = demix_merge_wall(base, comps[:2], root / "ties2", "ties")
        _, ties7 = demix_merge_wall(base, comps, root / "ties7", "ties")
        row(
            "   peak RSS, ties (all K tensors at once), K = 2",
            f"{ties2:.0f} MiB",
            f"{ties2 / rss2:.2f}x",
        )
        row(
            f"   peak RSS, ties, K = {k} (K - 2 more largest tensors: {largest * (k - 2):.0f} MiB)",
            f"{ties7:.0f} MiB",
            f"{ties7 / rss2:.2f}x",
        )

        if torch.cuda.is_available():
            print("4. CUDA")
            in_place_rows(row, base, comps, "cuda", args)
        else:
            row("4. CUDA: no GPU here, skipped", "-", "-")


if __name__ == "__main__":
    main()
