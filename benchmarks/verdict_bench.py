"""Paired bootstrap cost: 2,000 resamples of 10,000 documents, one seed and three seeds.

Prints the median wall time of demix.verdict.paired_bootstrap and of a category of two tasks,
measured in one run.
Usage: python benchmarks/verdict_bench.py [--docs 10000] [--resamples 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np
from timing import median_time

from demix.verdict import category_bootstrap, paired_bootstrap


def main() -> None:
    """Measure and print the bootstrap's cost for one and three seeds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{args.resamples} resamples, {args.docs} documents, median of {args.repeats}")
    for seeds in (1, 3):
        a = rng.normal(size=(seeds, args.docs))
        b = a + rng.normal(0.01, 0.5, size=(seeds, args.docs))
        one = median_time(
            lambda a=a, b=b: paired_bootstrap(a, b, resamples=args.resamples), args.repeats
        )
        two = median_time(
            lambda a=a, b=b: category_bootstrap([(a, b), (b, a)], resamples=args.resamples),
            args.repeats,
        )
        print(f"{seeds} seed(s): paired_bootstrap {one:.3f}s, category of 2 tasks {two:.3f}s")


if __name__ == "__main__":
    main()
