"""The search at real scale, computed from stated inputs: memory placement, proxy build time,
evaluation time and GPU hours, for bases of 0.5B, 1.5B and 7B parameters and K = 3, 7, 15.

Nothing here is measured: every number follows from the inputs printed above the table
(bandwidths, throughputs, the suite's tokens, the search's size). Placement and build time come
from demix.merge.plan.memory_plan (the plan `demix search` logs), for each GPU given with
--gpu NAME:FREE_GIB:COPY_TB_S:H2D_GB_S; benchmarks/gpu_check.sh prints that spec with the
bandwidths it measured. Evaluation: suite tokens / tokens per second, where tokens per second is
the achieved forward FLOP/s over 2 x params (or --eval-tokens-per-s, one per base). The trained-
proxy alternative (search.method: trained) trains each proxy from the base with the component
budget: tokens x 6 x params / (peak x MFU); the merged search trains K components once, with the
same budget each, and builds and evaluates every proxy. A search evaluates search.n proxies in its
first round and half as many in each next one (SearchConfig.round_sizes).

Usage: python benchmarks/scale_table.py [--gpu "H200:139:4.8:64"] [--suite-tokens 5e6] ...
"""

from __future__ import annotations

import argparse

from demix.errors import ModelError
from demix.merge.plan import Bandwidths, memory_plan

GIB = 2**30
DEFAULT_GPUS = [
    # free memory of an idle card as torch.cuda.mem_get_info reports it; nominal HBM bandwidth;
    # PCIe 5.0 x16 host-to-device (64 GB/s nominal per direction)
    "H100 80GB:79:3.35:64",
    "H200 141GB:139:4.8:64",
]


def gpu_spec(text: str) -> tuple[str, int, Bandwidths]:
    name, free, copy, h2d = text.rsplit(":", 3)
    return name, int(float(free) * GIB), Bandwidths(float(copy) * 1e12, float(h2d) * 1e9, "input")


def fmt_seconds(s: float) -> str:
    return f"{s:.2g}" if s < 1 else f"{s:.1f}"


def fmt_hours(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[0.5e9, 1.5e9, 7e9])
    parser.add_argument("--components", type=int, nargs="+", default=[3, 7, 15])
    parser.add_argument("--gpu", action="append", help="NAME:FREE_GIB:COPY_TB_S:H2D_GB_S")
    parser.add_argument("--host-gib", type=float, default=200, help="host memory per GPU")
    parser.add_argument(
        "--param-dtype", default="bfloat16", help="the proxy's: evaluate.dtype (auto: bf16 on CUDA)"
    )
    parser.add_argument("--delta-dtype", default="bfloat16")
    parser.add_argument("--method", default="linear")
    parser.add_argument("--n", type=int, default=64, help="search.n: proxies of the first round")
    parser.add_argument("--rounds", type=int, default=3, help="search.rounds (N, N/2, N/4, ...)")
    parser.add_argument("--suite-tokens", type=float, default=5e6)
    parser.add_argument("--eval-tflops", type=float, default=300.0)
    parser.add_argument("--eval-tokens-per-s", type=float, nargs="+")
    parser.add_argument("--proxy-tokens", type=float, default=30e9)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--mfu", type=float, default=0.40)
    args = parser.parse_args()
    gpus = [gpu_spec(g) for g in args.gpu or DEFAULT_GPUS]
    sizes = [max(1, args.n >> r) for r in range(args.rounds)]  # SearchConfig.round_sizes
    proxies = sum(sizes)
    train_flops = args.peak_tflops * 1e12 * args.mfu

    print("Inputs (stated, not measured here; defaults from configs/example-gpu.yaml or assumed):")
    for name, free, bw in gpus:
        print(
            f"- {name}: {free / GIB:.0f} GiB free, device copy {bw.device / 1e12:.2f} TB/s, "
            f"host-to-device {bw.host_to_device / 1e9:.0f} GB/s; {args.host_gib:.0f} GiB host "
            "memory per GPU (defaults: spec bandwidths, free memory of an idle card)"
        )
    print(
        f"- proxy (and base) in {args.param_dtype}, deltas in {args.delta_dtype}, "
        f"merge.method {args.method}"
    )
    print(
        f"- search: search.n {args.n}, search.rounds {args.rounds}: "
        f"{' + '.join(map(str, sizes))} = {proxies} proxies"
    )
    if args.eval_tokens_per_s:
        rates = ", ".join(f"{r:,.0f}" for r in args.eval_tokens_per_s)
        print(f"- evaluation: {args.suite_tokens:,.0f} tokens per proxy at {rates} tokens/s")
    else:
        print(
            f"- evaluation: {args.suite_tokens:,.0f} tokens per proxy at {args.eval_tflops:.0f} "
            f"TFLOP/s achieved by the {args.param_dtype} forward pass, 2 x params FLOP per token "
            "(both assumed)"
        )
    print(
        f"- training: {args.proxy_tokens:,.0f} tokens per trained proxy and per component "
        f"(train.component.tokens), 6 x params FLOP per token at {args.mfu:.0%} MFU (assumed) "
        f"of {args.peak_tflops:.0f} TFLOP/s (H100 dense bf16 peak)"
    )
    print()
    header = ["base", "K"]
    header += [f"{name}: deltas in, device + host GB, s/build" for name, _, _ in gpus]
    header += ["eval s/proxy"]
    header += [f"merged search GPU-h ({name})" for name, _, _ in gpus]
    header += ["K components' training GPU-h", "trained proxies GPU-h"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for i, n in enumerate(args.params):
        rate = (
            args.eval_tokens_per_s[i]
            if args.eval_tokens_per_s
            else args.eval_tflops * 1e12 / (2 * n)
        )
        eval_s = args.suite_tokens / rate
        train_h = args.proxy_tokens * 6 * n / train_flops / 3600
        for k in args.components:
            cells, searches = [f"{n / 1e9:g}B", str(k)], []
            for _, free, bw in gpus:
                try:
                    plan = memory_plan(
                        int(n), args.param_dtype, k, args.method, args.delta_dtype, "cuda:0",
                        free, int(args.host_gib * GIB), bw,
                    )  # fmt: skip
                except ModelError:
                    cells.append("does not fit")
                    searches.append("-")
                    continue
                cells.append(
                    f"{plan.delta_device}, {plan.device_bytes / 1e9:.0f} + "
                    f"{plan.host_bytes / 1e9:.0f}, {fmt_seconds(plan.seconds_per_build)}"
                )
                searches.append(fmt_hours(proxies * (plan.seconds_per_build + eval_s) / 3600))
            cells += [f"{eval_s:,.0f}", *searches]
            cells += [fmt_hours(k * train_h), fmt_hours(proxies * train_h)]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
