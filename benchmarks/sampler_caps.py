"""How often the authors' one-pass capping leaves a row over its caps, against demix's sampler.

The authors' sample.py caps each dataset in turn, multiplying the whole row to spread the
excess, so an entry capped earlier can be lifted over its cap again. This script re-expresses
that loop (vectorised over rows) with everything else as in demix's sampler, and prints the
share of rows over a cap and the per-dataset variance of the weights, theirs over ours.
Usage: python benchmarks/sampler_caps.py [--prior 1278,284,69,100,51,141,633] [--draws 100000]
"""

from __future__ import annotations

import argparse

import numpy as np

from demix.config import SamplerConfig
from demix.search.sampler import sample_mixtures, tempered_prior


def one_pass_caps(prior: np.ndarray, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of the Dirichlet(s * q) sampler with the authors' one pass of caps, zeroing and grid."""
    cfg = SamplerConfig()
    q = tempered_prior(prior, cfg.power)
    cap = np.minimum(cfg.cap_factor * prior, 1.0)
    scales = np.logspace(np.log10(cfg.scale_min), np.log10(cfg.scale_max), cfg.num_scales)
    s = rng.choice(scales, size=draws)
    w = rng.gamma(s[:, None] * q[None, :])
    w /= w.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        for j in range(len(prior)):
            over = w[:, j] - cap[j]
            hit = over > 0
            w[hit] *= (1 + over[hit] / (1 - w[hit, j]))[:, None]
            w[hit, j] = cap[j]
    w = w[np.isfinite(w).all(axis=1)]
    w = np.where(w < cfg.min_weight, 0.0, w)
    w /= w.sum(axis=1, keepdims=True)
    w = np.round(w / cfg.grid) * cfg.grid
    return w / w.sum(axis=1, keepdims=True)


def main() -> None:
    """Print the share of rows over a cap and the variance ratios per dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="1278,284,69,100,51,141,633")
    parser.add_argument("--draws", type=int, default=100_000)
    args = parser.parse_args()
    prior = np.array([float(x) for x in args.prior.split(",")])
    prior /= prior.sum()
    cap = np.minimum(4 * prior, 1.0)
    theirs = one_pass_caps(prior, args.draws, np.random.default_rng(0))
    ours = sample_mixtures(prior, args.draws, np.random.default_rng(1), SamplerConfig())
    over = theirs > cap + 1e-9
    print("caps          ", np.round(cap, 3))
    print(f"one pass: {over.any(axis=1).mean():.1%} of rows over a cap; per dataset", end=" ")
    print(np.round(over.mean(axis=0), 3), "max weight", np.round(theirs.max(axis=0), 3))
    print(f"demix:    {(ours > cap + 1e-9).any(axis=1).mean():.1%} of rows over a cap")
    print("variance one pass / demix", np.round(theirs.var(axis=0) / ours.var(axis=0), 2))


if __name__ == "__main__":
    main()
