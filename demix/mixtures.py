"""Mixture arithmetic: the token prior, the mixing matrix M, data -> component weights, baselines.

A data mixture d says what a model trains on. Component i was trained on `general_ratio` general
data plus the rest dataset i (column i of M), so the merged proxy of d uses component weights
c = M^-1 d (`merge.weights: data` and `hull`) or c = d (`merge.weights: component`). A mixture
with some c < 0 lies outside the hull of the components' training mixes: its proxy
extrapolates. `hull` searches only the mixtures inside, d = g x general + (1 - g) c with c on
the simplex (g = general_ratio). Everything here is numpy on the curated dataset's names and
token counts; no model is read. A mixture given as text (`--mixture`: NAME=W,..., JSON or a
JSON file) is parsed here too (`parse_mixture`) and checked against the data by
`validate_mixture`: one place reads and checks mixtures.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from demix.config import DataConfig, MergeConfig, SearchConfig, TrainConfig, per_dataset
from demix.errors import DemixError, MixtureError, json_type, one_line

if TYPE_CHECKING:  # annotations only: the curated data's reader imports this module
    from demix.data.shards import CuratedData

# The final models a run trains: the chosen mixture and the two baselines, in report order.
FINAL_LABELS = ("chosen", "uniform", "token_prior")

# A component weight above -HULL_TOLERANCE counts as >= 0 (rounding in c = M^-1 d).
HULL_TOLERANCE = 1e-9


def as_dict(names: list[str], weights) -> dict[str, float]:
    """Weights in `names` order as {name: float}."""
    return {n: float(w) for n, w in zip(names, weights, strict=True)}


def component_mix_matrix(names: list[str], general: np.ndarray, general_ratio: float) -> np.ndarray:
    """M with M[:, i] = training data mix of component i (rows: datasets)."""
    d = len(names)
    general = np.asarray(general, dtype=np.float64)
    return general_ratio * np.outer(general, np.ones(d)) + (1 - general_ratio) * np.eye(d)


def data_to_component(mix_matrix: np.ndarray, data_weights: np.ndarray) -> np.ndarray:
    """c solving M c = d (exact when M is invertible, least squares otherwise)."""
    d = np.asarray(data_weights, dtype=np.float64)
    if mix_matrix.shape[0] == mix_matrix.shape[1]:
        return np.linalg.solve(mix_matrix, d)
    return np.linalg.lstsq(mix_matrix, d, rcond=None)[0]


def validate_mixture(weights: dict[str, float], names: list[str]) -> np.ndarray:
    """A {dataset: weight} mapping as a simplex point in `names` order; missing names count as 0.

    Raises MixtureError for unknown names, non-numbers, NaN/inf, negative weights, or a sum
    off 1 by more than 1e-6.
    """
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise MixtureError(
            f"mixture names unknown dataset(s) {unknown}; known: {names} (check the spelling)"
        )
    values = []
    for name in names:
        value = weights.get(name, 0.0)
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise MixtureError(
                f"mixture weight of {name!r} is {value!r}, not a number; give a float in [0, 1]"
            ) from None
    w = np.array(values, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        bad = [n for n, x in zip(names, w, strict=True) if not math.isfinite(x)]
        raise MixtureError(f"mixture weight of {bad} is NaN or infinite; give floats in [0, 1]")
    if (w < 0).any():
        bad = {n: float(x) for n, x in zip(names, w, strict=True) if x < 0}
        raise MixtureError(f"mixture has negative weights {bad}; weights must be >= 0")
    if abs(w.sum() - 1) > 1e-6:
        raise MixtureError(
            f"mixture weights sum to {w.sum():.8f}, not 1 (within 1e-6); rescale them to sum 1"
        )
    return w


def prior_vector(data: CuratedData) -> np.ndarray:
    """The token prior (each dataset's share of the training tokens) in `data.names` order."""
    return np.array([data.token_prior[n] for n in data.names])


def general_mix(data_cfg: DataConfig, data: CuratedData) -> np.ndarray:
    """The general data every component sees: the named general dataset, else the token prior."""
    if data_cfg.general is not None:
        g = np.zeros(len(data.names))
        g[data.names.index(data_cfg.general)] = 1.0
        return g
    return prior_vector(data)


@dataclass(frozen=True, eq=False)
class Mixing:
    """How a run's components mix the data and how a data mixture becomes merge weights, built
    once from the config's sections and the curated data (`Mixing.of`).

    Component i trains on `general_ratio` x the general mix plus the rest on dataset i (column
    i of `matrix`, M); the proxy of a data mixture d merges with c = d (`merge.weights:
    component`) or c = M^-1 d (`data`, `hull`); under `hull` every searched mixture holds
    g x the general mix (`floor`), so that c >= 0.
    """

    names: list[str]
    general: np.ndarray  # the general mix (general_mix)
    general_ratio: float  # train.general_ratio
    weights: str  # merge.weights

    @classmethod
    def of(
        cls, data_cfg: DataConfig, train: TrainConfig, merge: MergeConfig, data: CuratedData
    ) -> Mixing:
        """The Mixing of a run: data.general, train.general_ratio, merge.weights on `data`."""
        return cls(data.names, general_mix(data_cfg, data), train.general_ratio, merge.weights)

    @property
    def matrix(self) -> np.ndarray:
        """M: column i is component i's training data mix."""
        return component_mix_matrix(self.names, self.general, self.general_ratio)

    @property
    def floor(self) -> np.ndarray | None:
        """The part of every searched mixture held fixed: under `hull`, g x the general mix, so
        every candidate is d = M c with c >= 0 (demix.search.sampler); else None (the whole
        simplex)."""
        return self.general_ratio * self.general if self.weights == "hull" else None

    def training_mix(self, dataset: str) -> dict[str, float]:
        """The data mix component `dataset` trains on (its column of M).

        Raises DemixError when `dataset` is not one of the curated datasets.
        """
        if dataset not in self.names:
            raise DemixError(f"--dataset {dataset!r} is not one of {self.names}")
        return as_dict(self.names, self.matrix[:, self.names.index(dataset)])

    def merge_weights(self, mixture: np.ndarray) -> np.ndarray:
        """Component weights of the proxy for a data mixture [D], or for each row of [n, D]
        (`merge.weights`: c = d for `component`, c = M^-1 d for `data` and `hull`)."""
        mixture = np.asarray(mixture, dtype=np.float64)
        if self.weights == "component":
            return mixture
        return data_to_component(self.matrix, mixture.T).T  # a column per mixture


def epochs(
    mixture: dict[str, float], train_tokens: dict[str, int], final_tokens: int
) -> dict[str, float | None]:
    """The epochs of each dataset's train tokens that `final_tokens` of training on `mixture`
    takes: weight x final_tokens / train_tokens (None for a dataset without train tokens)."""
    return {
        n: w * final_tokens / train_tokens[n] if train_tokens[n] else None
        for n, w in mixture.items()
    }


def max_epochs(search: SearchConfig, data: CuratedData) -> dict[str, float | None]:
    """search.max_epochs of each dataset (None: not capped)."""
    return {n: per_dataset(search.max_epochs, n) for n in data.names}


def epoch_caps(
    train: TrainConfig, search: SearchConfig, data: CuratedData
) -> dict[str, float | None]:
    """The weight search.max_epochs allows each dataset: max_epochs x its whole train tokens
    (estimated under data.max_tokens) / train.final.tokens, at most 1 (None: not capped)."""
    final = train.final.tokens
    return {
        n: None if e is None else min(1.0, e * data.full_train_tokens[n] / final)
        for n, e in max_epochs(search, data).items()
    }


def search_cap(
    search: SearchConfig, train: TrainConfig, data: CuratedData, floor: np.ndarray | None
) -> np.ndarray | None:
    """The most weight each dataset may take in a searched mixture (epoch_caps; 1 where not
    capped), for demix.search.sample_mixtures; None without search.max_epochs. `floor`: the
    Mixing's (what every searched mixture holds).

    Raises MixtureError (one line, naming the datasets and the epochs needed) when the caps
    cannot hold a whole mixture, or, under merge.weights: hull, lie under the search floor.
    """
    if search.max_epochs is None:
        return None
    caps = epoch_caps(train, search, data)
    cap = np.array([1.0 if c is None else c for c in caps.values()])
    final = train.final.tokens
    if cap.sum() < 1 - 1e-9:  # every dataset is capped
        tokens = sum(data.full_train_tokens.values())
        raise MixtureError(
            f"search.max_epochs caps the weights of {data.names} at {cap.sum():.4g} in all, "
            f"under 1: train.final.tokens={final} takes {final / tokens:.4g} epochs of their "
            f"{tokens} train tokens; raise search.max_epochs to at least that or lower "
            "train.final.tokens"
        )
    over = [] if floor is None else np.flatnonzero(floor > cap + 1e-12)
    if len(over):
        held = {data.names[i]: round(float(floor[i]), 6) for i in over}
        needed = {n: round(f * final / data.full_train_tokens[n], 4) for n, f in held.items()}
        raise MixtureError(
            f"under merge.weights: hull every searched mixture holds train.general_ratio x the "
            f"general mix, {held}, more weight than search.max_epochs allows; those datasets "
            f"need max_epochs of at least {needed}, or lower train.general_ratio"
        )
    return cap


@dataclass(frozen=True)
class SearchSpace:
    """Where the search moves: the dataset names, the token prior, and each weight's floor and
    cap (None: none), built once from the config and the curated data (`search_space`)."""

    names: list[str]
    prior: np.ndarray
    floor: np.ndarray | None
    cap: np.ndarray | None


def search_space(
    mixing: Mixing, search: SearchConfig, train: TrainConfig, data: CuratedData
) -> SearchSpace:
    """The SearchSpace of a run. Raises MixtureError as search_cap does."""
    floor = mixing.floor
    return SearchSpace(
        data.names, prior_vector(data), floor, search_cap(search, train, data, floor)
    )


def in_hull(components: np.ndarray) -> np.ndarray:
    """Whether each row of component weights [n, D] (or one [D]) has every c >= 0."""
    return (np.asarray(components) >= -HULL_TOLERANCE).all(axis=-1)


def negative_share(components: np.ndarray) -> float:
    """The share of the rows of component weights [n, D] with some c < 0 (0 with no rows)."""
    components = np.asarray(components).reshape(-1, np.shape(components)[-1])
    return float((~in_hull(components)).mean()) if len(components) else 0.0


def baseline_mixtures(data: CuratedData) -> dict[str, dict[str, float]]:
    """Uniform over datasets and the token-proportional prior."""
    n = len(data.names)
    return {
        "uniform": {name: 1.0 / n for name in data.names},
        "token_prior": dict(data.token_prior),
    }


@dataclass(frozen=True)
class SeededRun:
    """One training run of a labelled mixture (a final model, a reference): its label and its
    training seed's offset from the run's seed, an explicit value wherever the run travels."""

    label: str
    seed_offset: int = 0

    @property
    def name(self) -> str:
        """The run's model and folder name: the label, `-seed<s>` added for a further seed (a
        name to show and to key artifacts by; the seed is never read back from it)."""
        return self.label if not self.seed_offset else f"{self.label}-seed{self.seed_offset}"


def seeded_runs(labels, seeds: int) -> list[SeededRun]:
    """Each label for each of `seeds` training seeds, seeds in order within a label."""
    return [SeededRun(label, s) for label in labels for s in range(seeds)]


def final_runs(seeds: int) -> list[SeededRun]:
    """The final models of a run: each of FINAL_LABELS for each seed."""
    return seeded_runs(FINAL_LABELS, seeds)


def final_run(name: str, seeds: int) -> SeededRun:
    """The final run called `name` among a run's `final_runs(seeds)`.

    Raises DemixError naming the runs there are when there is none of that name.
    """
    runs = {run.name: run for run in final_runs(seeds)}
    if name not in runs:
        raise DemixError(f"final model {name!r}: the run trains {list(runs)} (final.seeds={seeds})")
    return runs[name]


def final_mixture(label: str, selection: dict, data: CuratedData) -> dict[str, float]:
    """The data mixture of a final model's label: the chosen one or a baseline.

    Raises DemixError for a label that is none of FINAL_LABELS.
    """
    if label == "chosen":
        return selection["mixture"]
    baselines = baseline_mixtures(data)
    if label not in baselines:
        raise DemixError(f"final model label {label!r} is not one of {list(FINAL_LABELS)}")
    return baselines[label]


def components_in_order(data: CuratedData, components: dict) -> list:
    """The component of each dataset, in `data.names` order.

    Raises DemixError naming the datasets that have no component.
    """
    missing = sorted(set(data.names) - set(components))
    if missing:
        raise DemixError(f"no component model given for dataset(s) {missing}")
    return [components[n] for n in data.names]


# ------------------------------------------------------------------------- a mixture as text


def parse_mixture(text: str) -> dict[str, float]:
    """'general=0.5,code=0.3,math=0.2', a JSON object (or {"mixture": {...}}), or a path to a
    JSON file of either: {dataset: weight}, every weight a finite number >= 0.

    Raises MixtureError naming the entry (or file) for text that is none of these.
    """

    source = f"mixture {text[:80]!r}" + ("..." if len(text) > 80 else "")
    if text.endswith(".json") and not text.lstrip().startswith(("{", "[")):
        source = f"mixture file {text if text.isprintable() else repr(text)}"
        try:
            text = Path(text).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as err:
            wide = "UTF-16 encoded" if err.object[:2] in (b"\xff\xfe", b"\xfe\xff") else None
            raise MixtureError(
                f"{source}: {wide or f'not UTF-8 text (bad byte at offset {err.start})'}; "
                "convert it to UTF-8"
            ) from None
        except (OSError, ValueError) as err:  # ValueError: a NUL in the path
            reason = getattr(err, "strerror", None) or one_line(err)
            raise MixtureError(f"{source}: cannot read it ({reason})") from None
        return _mixture_json(text.strip(), source)
    text = text.strip()
    if text.startswith(("{", "[")):
        return _mixture_json(text, source)
    out: dict[str, float] = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise MixtureError(
                f"mixture entry {part!r}: expected name=weight (e.g. general=0.5,code=0.5)"
            )
        if name in out:
            raise MixtureError(f"mixture entry {part!r}: {name!r} is given twice; give it once")
        try:
            out[name] = _weight(name, float(value))
        except ValueError:
            raise MixtureError(
                f"mixture entry {part!r}: {value!r} is not a number; write name=weight with "
                "weights summing to 1"
            ) from None
    return _no_negatives(out)


def _mixture_json(text: str, source: str) -> dict[str, float]:
    """A mixture given as JSON: an object of weights, or {"mixture": {...}}.

    Raises MixtureError for text that is not JSON, not an object, or names a dataset twice, and
    naming the entry of a weight that is not a finite number >= 0.
    """

    def unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
        """A JSON object's pairs as a dict; MixtureError when a key is given twice."""
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise MixtureError(f"{source}: {key!r} is given twice; give each dataset once")
            seen[key] = value
        return seen

    try:
        raw = json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as err:
        raise MixtureError(
            f"{source}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except (ValueError, RecursionError) as err:  # too many digits; nested too deeply
        reason = "nested too deeply" if isinstance(err, RecursionError) else one_line(err)
        raise MixtureError(f"{source}: not valid JSON ({reason})") from None
    if isinstance(raw, dict) and isinstance(raw.get("mixture"), dict):
        raw = raw["mixture"]
    if not isinstance(raw, dict):
        raise MixtureError(
            f"{source}: expected a JSON object {{dataset: weight}}, got {json_type(raw)}; "
            'e.g. {"general": 0.5, "code": 0.5}'
        )
    out = {}
    for name, value in raw.items():
        if not name.strip():
            raise MixtureError(f"{source}: a dataset name is empty; name each weight's dataset")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MixtureError(
                f"mixture entry {name!r}: weight is {json_type(value)} ({value!r:.60}), not a "
                "number; give a float in [0, 1]"
            )
        try:
            out[name] = _weight(name, float(value))
        except OverflowError:
            raise MixtureError(
                f"mixture entry {name!r}: weight is too large for a float; give a float in [0, 1]"
            ) from None
    return _no_negatives(out)


def _weight(name: str, value: float) -> float:
    """`value` when it is finite.

    Raises MixtureError naming the entry of a NaN or infinite weight.
    """
    if not math.isfinite(value):
        raise MixtureError(
            f"mixture weight of {name!r} is NaN or infinite ({value}); give a float in [0, 1]"
        )
    return value


def _no_negatives(mixture: dict[str, float]) -> dict[str, float]:
    """`mixture` when no weight is negative.

    Raises MixtureError naming every negative entry.
    """
    bad = {name: w for name, w in mixture.items() if w < 0}
    if bad:
        raise MixtureError(
            f"mixture has negative weights {bad}; a weight is a share of the data, 0 or more"
        )
    return mixture
