"""Mixture search: Dirichlet sampler, LightGBM predictor, rounds, results table, loop."""

from demix.search.loop import (
    evaluate_proposals,
    final_selection,
    round_proposals,
    run_search,
    weights_matrix,
)
from demix.search.predictor import Predictor, cross_val_predictions, heldout_spearman
from demix.search.results import ScoresTable, mixture_id
from demix.search.rounds import propose_round, select_final
from demix.search.sampler import sample_mixtures, uniform_mixture, validate_mixture

__all__ = [
    "Predictor",
    "ScoresTable",
    "cross_val_predictions",
    "evaluate_proposals",
    "final_selection",
    "heldout_spearman",
    "mixture_id",
    "propose_round",
    "round_proposals",
    "run_search",
    "sample_mixtures",
    "select_final",
    "uniform_mixture",
    "validate_mixture",
    "weights_matrix",
]
