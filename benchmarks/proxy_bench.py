"""Proxy build cost: DeltaStack.write (in place) vs the memcpy floor vs a disk merge + load.

Prints medians and ratios measured in one run on Llama-shaped models built from config.
The floor is the memory traffic of a proxy: read K deltas and the base, write one model, i.e.
(K + 2) model sizes at the bandwidth of a plain copy measured in the same run (a copy moves
2 bytes of traffic per byte: one read, one write).
Usage: python benchmarks/proxy_bench.py [--hidden 512] [--layers 8] [--components 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import median_time

from demix.config import ArchitectureConfig
from demix.merge import DeltaStack, merge_to_disk
from demix.model import build_tiny_llama, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--components", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    arch = ArchitectureConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=8,
        intermediate_size=args.hidden * 8 // 3,
        max_position_embeddings=256,
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_llama(arch, args.vocab, 0, seed=0)
        base.save_pretrained(root / "base")
        comps = []
        for k in range(args.components):
            m = build_tiny_llama(arch, args.vocab, 0, seed=0)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            m.save_pretrained(root / f"c{k}")
            comps.append(root / f"c{k}")
        n_params = sum(p.numel() for p in base.parameters())
        model = load_model(root / "base")
        stack = DeltaStack(model, root / "base", comps)
        weights = np.full(args.components, 1.0 / args.components)

        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        dst = torch.empty_like(flat)

        def copy():
            dst.copy_(flat)

        def in_place():
            stack.write(weights)

        def disk():
            merge_to_disk(root / "base", comps, weights, root / "merged")
            load_model(root / "merged")

        t_copy = median_time(copy, args.repeats)
        t_floor = t_copy * (args.components + 2) / 2
        t_place = median_time(in_place, args.repeats)
        t_disk = median_time(disk, max(3, args.repeats // 2))
    gb = (args.components + 2) * flat.numel() * 4 / 1e9
    print(
        f"model: {n_params / 1e6:.1f}M params (fp32), K = {args.components} components, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'method':<44}{'median s':>10}{'GB/s':>8}{'x floor':>9}")
    for name, t in [
        ("floor: (K+2) model sizes at copy bandwidth", t_floor),
        ("DeltaStack.write (in place)", t_place),
        ("disk merge + load", t_disk),
    ]:
        print(f"{name:<44}{t:>10.4f}{gb / t:>8.1f}{t / t_floor:>9.2f}")
    print(
        f"in-place proxy is {t_disk / t_place:.1f}x faster than writing and reloading a merged model"
    )


if __name__ == "__main__":
    main()
