"""Search cost of the candidate pool: sampling + LightGBM prediction at 100k vs 200k candidates.

Prints medians and ratios measured in one run: sampling a pool, predicting it with a predictor
fitted on one search's worth of scored proxies (n + n/2 + n/4), and the two steps that use a
pool, an intermediate round (propose_round) and the final selection (select_final).
Usage: python benchmarks/search_bench.py [--prior 1278,284,69,100,51,141,633] [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import median_time

from demix.config import SearchConfig
from demix.search.predictor import Predictor
from demix.search.rounds import propose_round, select_final
from demix.search.sampler import sample_mixtures

# the authors' 7-dataset token prior (iterative_sample/sample.py)
AUTHORS_PRIOR = "1278,284,69,100,51,141,633"


def main() -> None:
    """Measure and print the pool costs at each pool size, and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default=AUTHORS_PRIOR, help="token counts, comma-separated")
    parser.add_argument("--sizes", default="100000,200000")
    parser.add_argument("--n", type=int, default=8, help="search.n: proxies of the first round")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    prior = np.array([float(x) for x in args.prior.split(",")])
    prior /= prior.sum()
    sizes = [int(x) for x in args.sizes.split(",")]
    base = SearchConfig(n=args.n)
    scored = sum(base.round_sizes)
    X = sample_mixtures(prior, scored, np.random.default_rng(0), base.sampler)
    y = X @ np.linspace(1.0, -1.0, len(prior))  # any smooth score; costs do not depend on it
    first = base.round_sizes[0]
    print(f"{len(prior)} datasets, predictor fitted on {scored} proxies, {args.repeats} repeats")

    results: dict[int, dict[str, float]] = {}
    for size in sizes:
        cfg = base.model_copy(update={"candidates": size})
        pool = sample_mixtures(prior, size, np.random.default_rng(1), cfg.sampler)
        predictor = Predictor(cfg.predictor, 0).fit(X, y)
        results[size] = {
            "sample": median_time(
                lambda cfg=cfg, size=size: sample_mixtures(
                    prior, size, np.random.default_rng(1), cfg.sampler, exclude=X
                ),
                args.repeats,
            ),
            "predict": median_time(lambda p=predictor, x=pool: p.predict(x), args.repeats),
            "propose_round": median_time(
                lambda cfg=cfg: propose_round(
                    1, base.round_sizes[1], prior, X[:first], y[:first], cfg, 0
                ),
                args.repeats,
            ),
            "select_final": median_time(
                lambda cfg=cfg: select_final(prior, X, y, cfg, 0), args.repeats
            ),
        }
    print(f"{'step':<15}" + "".join(f"{s:>12,}" for s in sizes) + f"{'ratio':>9}")
    for step in results[sizes[0]]:
        row = [results[s][step] for s in sizes]
        print(f"{step:<15}" + "".join(f"{t:>11.3f}s" for t in row) + f"{row[-1] / row[0]:>8.2f}x")
    search = {}
    for s in sizes:
        search[s] = (base.rounds - 1) * results[s]["propose_round"] + results[s]["select_final"]
    print(
        f"one search ({base.rounds - 1} intermediate rounds + final): "
        + ", ".join(f"{s:,}: {search[s]:.2f}s" for s in sizes)
        + f" ({search[sizes[-1]] / search[sizes[0]]:.2f}x)"
    )


if __name__ == "__main__":
    main()
