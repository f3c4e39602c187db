"""`demix export`: the chosen mixture of a finished run in the forms training frameworks read.

- json: the data mixture, the component weights, the token prior, the train tokens of each
  dataset, the final budget (train.final.tokens) and the epochs of each dataset that budget
  would take (weight x final tokens / train tokens); the pipeline's `export` artifact too;
- megatron: Megatron-LM's `--data-path` argument, "w1 prefix1 w2 prefix2 ...";
- olmo: an OLMo-core `SourceMixtureList` (olmo_core.data.source_mixture) in YAML: per source
  source_name, target_ratio, paths and max_repetition_ratio (the epochs above, at least 1);
- hf: `datasets`, `probabilities` and `stopping_strategy` for datasets.interleave_datasets.

megatron, olmo and hf leave out datasets of weight 0 (interleave_datasets would never exhaust
a source it never draws). A mixture that does not sum to 1 (within MIXTURE_TOLERANCE) is
refused in every format, never renormalized.

What export writes says so, so that `--out` replaces only an earlier export (is_export): the
json and hf forms carry "kind": "demix.export", olmo opens with a `#` comment naming demix, and
a megatron file (not the standard output, which `--data-path $(...)` reads) opens with one:
pass it on as `--data-path $(grep -v '^#' FILE)`. Paths (megatron, olmo) are the dataset
names unless given; epochs count demix's tokens of the whole dataset (estimated from the sample
under data.max_tokens), so another tokenizer shifts them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from demix.errors import DataError, DemixError
from demix.mixtures import epochs

EXPORT_KIND = "demix.export"
FORMATS = ("json", "megatron", "olmo", "hf")
OLMO_HEADER = "# demix export: an OLMo-core SourceMixtureList"
MEGATRON_HEADER = "# demix export: a Megatron-LM --data-path (weight prefix pairs)"
MIXTURE_TOLERANCE = 1e-6  # how far from 1 a run's mixture may sum
_NUMBER = r"[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?"
_MEGATRON = re.compile(rf"(?:{_NUMBER} \S+ )*{_NUMBER} \S+\n")


def mixture_export(
    names: list[str],
    mixture: dict[str, float],
    component_weights: dict[str, float],
    token_prior: dict[str, float],
    train_tokens: dict[str, int],
    final_tokens: int,
) -> dict:
    """The `json` export: everything the other formats are made of."""
    return {
        "kind": EXPORT_KIND,
        "datasets": list(names),
        "mixture": {n: float(mixture[n]) for n in names},
        "component_weights": {n: float(component_weights[n]) for n in names},
        "token_prior": {n: float(token_prior[n]) for n in names},
        "train_tokens": {n: int(train_tokens[n]) for n in names},
        "final_tokens": int(final_tokens),
        "epochs": epochs({n: mixture[n] for n in names}, train_tokens, final_tokens),
    }


def selection_export(data, selection: dict, final_tokens: int) -> dict:
    """The `json` export of a search's result.json (the pipeline's `export` artifact), for a
    final model of `final_tokens` (train.final.tokens)."""
    return mixture_export(
        data.names,
        selection["mixture"],
        selection["component_weights"],
        data.token_prior,
        data.full_train_tokens,
        final_tokens,
    )


def _read_json(path: Path, run: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{run}: not a finished demix run folder (no {path.relative_to(run)}); give the --out "
            "folder of a finished `demix run` or `pipeline.py run-local`"
        ) from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(found, dict):
        raise DataError(f"{path}: not a JSON object")
    return found


def read_run(run: str | Path) -> dict:
    """The `json` export of a finished run folder: its summary.json (and, for summaries
    written before they held train tokens and the final budget, dataset/manifest.json and
    config.json). Raises DataError naming the folder or file when it is no finished run."""
    run = Path(run)
    summary = _read_json(run / "summary.json", run)
    names = summary.get("datasets")
    fields = ("mixture", "component_weights", "token_prior")
    if not (
        isinstance(names, list)
        and all(isinstance(n, str) for n in names)
        and all(isinstance(summary.get(f), dict) for f in fields)
    ):
        raise DataError(f"{run / 'summary.json'}: not the summary of a finished demix run")
    train = summary.get("dataset_train_tokens")
    if train is None:
        manifest = _read_json(run / "dataset" / "manifest.json", run)
        train = {  # the whole dataset's tokens; runs before data.max_tokens counted them all
            n: _get(manifest, "datasets", n, "full_train_tokens")
            or _get(manifest, "datasets", n, "train_tokens")
            for n in names
        }
    final = summary.get("final_tokens")
    if final is None:
        final = _get(_read_json(run / "config.json", run), "train", "final", "tokens")
    for field, values in (*((f, summary[f]) for f in fields), ("train tokens", train)):
        if bad := [n for n in names if not _number(_get(values, n))]:
            raise DataError(f"{run}: the run's {field} gives no number for datasets {bad}")
    weights = [summary["mixture"][n] for n in names]
    if not _number(final) or min(weights, default=0) < 0 or sum(weights) <= 0:
        raise DataError(f"{run}: the run records no final token budget or no valid mixture")
    return mixture_export(names, *(summary[f] for f in fields), train, final)


def _get(obj, *keys):
    """obj[k1][k2]...; None where a key is missing or a value on the way is no object."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_prefixes(items: list[str], names: list[str]) -> dict[str, str]:
    """--prefix NAME=PATH items as {name: path}. Raises DemixError naming a bad item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or len(path.split()) != 1:
            raise DemixError(f"--prefix {item!r}: expected NAME=PATH, a path without spaces")
        if name not in names:
            raise DemixError(f"--prefix {item!r}: {name!r} is not a dataset of the run {names}")
        if name in out:
            raise DemixError(f"--prefix {item!r}: {name!r} is given twice")
        out[name] = path
    return out


def render(export: dict, fmt: str, prefixes: dict[str, str] | None = None) -> str:
    """The text of `export` (a `json` export) in format `fmt` (one of FORMATS).

    Raises DataError when the mixture does not sum to 1, DemixError for a bad format or prefix.
    """
    prefixes = prefixes or {}
    if prefixes and fmt not in ("megatron", "olmo"):
        raise DemixError(f"--prefix names data paths of --format megatron or olmo, not {fmt}")
    mixture = export["mixture"]
    total = math.fsum(mixture.values())
    if not abs(total - 1) <= MIXTURE_TOLERANCE:
        raise DataError(
            f"the run's mixture sums to {total:.10g}, not 1 (within {MIXTURE_TOLERANCE:g}); its "
            "summary.json was edited or is corrupt: fix the weights, demix does not renormalize"
        )
    if fmt == "json":
        return json.dumps(export, indent=2) + "\n"
    weights = {n: w / total for n, w in mixture.items() if w > 0}  # float noise divided out
    paths = {n: prefixes.get(n, n) for n in weights}
    if fmt == "megatron":
        return " ".join(f"{w:.10g} {paths[n]}" for n, w in weights.items()) + "\n"
    if fmt == "hf":
        hf = {"datasets": list(weights), "probabilities": list(weights.values())}
        hf = {"kind": EXPORT_KIND, **hf, "stopping_strategy": "all_exhausted"}
        return json.dumps(hf, indent=2) + "\n"
    if fmt != "olmo":
        raise DemixError(f"--format {fmt!r}: give one of {', '.join(FORMATS)}")
    sources = [
        {
            "source_name": n,
            "target_ratio": w,
            "paths": [paths[n]],
            # the epochs the final budget takes of it, rounded up; OLMo-core wants >= 1
            "max_repetition_ratio": max(1.0, math.ceil((export["epochs"][n] or 0) * 100) / 100),
        }
        for n, w in weights.items()
    ]
    return (
        f"{OLMO_HEADER} (olmo_core.data.source_mixture);\n"
        f"# the final budget, requested_tokens of SourceMixtureDatasetConfig: "
        f"{export['final_tokens']}\n" + yaml.safe_dump({"sources": sources}, sort_keys=False)
    )


def file_text(text: str, fmt: str) -> str:
    """What `export --out` writes: `text` (render's), a megatron one under MEGATRON_HEADER."""
    return f"{MEGATRON_HEADER}\n{text}" if fmt == "megatron" else text


def is_export(data: bytes) -> bool:
    """Whether a file holds what `demix export --out` writes, in any format (--out may replace
    it): a megatron or olmo file under its header, a JSON object of kind demix.export."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    first, _, rest = text.partition("\n")
    if first == MEGATRON_HEADER:
        return bool(_MEGATRON.fullmatch(rest))
    if first.startswith(OLMO_HEADER):
        try:
            found = yaml.safe_load(text)
        except yaml.YAMLError:
            return False
        return isinstance(found, dict) and isinstance(found.get("sources"), list)
    try:
        found = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(found, dict)
        and found.get("kind") == EXPORT_KIND
        and isinstance(found.get("datasets"), list)
    )
