"""Mixture search: Dirichlet sampler, LightGBM predictor, rounds, results table, loop.

The names below are imported on first use (demix.lazy): the sampler alone does not import
LightGBM."""

from demix.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__,
    {
        "Predictor": "demix.search.predictor",
        "ScoresTable": "demix.search.results",
        "canonical_rows": "demix.search.loop",
        "cross_val_predictions": "demix.search.predictor",
        "evaluate_proposals": "demix.search.loop",
        "final_selection": "demix.search.loop",
        "heldout_spearman": "demix.search.predictor",
        "mixture_id": "demix.search.results",
        "propose_round": "demix.search.rounds",
        "round_proposals": "demix.search.loop",
        "run_search": "demix.search.loop",
        "sample_mixtures": "demix.search.sampler",
        "search_objective": "demix.search.objective",
        "select_final": "demix.search.rounds",
        "uniform_mixture": "demix.search.sampler",
        "validate_mixture": "demix.mixtures",
        "weights_matrix": "demix.search.loop",
    },
)

__all__ = [
    "Predictor",
    "ScoresTable",
    "canonical_rows",
    "cross_val_predictions",
    "evaluate_proposals",
    "final_selection",
    "heldout_spearman",
    "mixture_id",
    "propose_round",
    "round_proposals",
    "run_search",
    "sample_mixtures",
    "search_objective",
    "select_final",
    "uniform_mixture",
    "validate_mixture",
    "weights_matrix",
]
