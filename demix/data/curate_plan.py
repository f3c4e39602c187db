"""Curation, plan: the input files listed once, split into groups of about equal bytes, and a
keep fraction per dataset (data.max_tokens); the plan every group and the reduce read back."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from demix.config import DataConfig, DatasetSpec, per_dataset
from demix.data.lines import DocumentLimit
from demix.data.sources import (
    InputFile,
    clean_document,
    input_files,
    read_file_documents,
)
from demix.data.tokenizer import (
    encode_documents,
    file_order,
    load_base_tokenizer,
    tokenizer_sample,
    train_tokenizer,
)
from demix.errors import DataError
from demix.storage import (
    atomic_write_json,
    fetch_files,
    read_manifest,
    staged_dir,
    write_manifest,
)

PLAN_KIND = "demix.curation_plan"
GROUP_KIND = "demix.curation_group"
PLAN_FILE = "plan.json"
# The most tokens the plan reads of a dataset to measure its bytes per token (data.max_tokens).
PROBE_TOKENS = 1 << 24

log = logging.getLogger(__name__)


def group_bounds(sizes: list[int], groups: int) -> list[tuple[int, int]]:
    """Split files (in order) into min(groups, files) contiguous runs of about equal bytes.

    Run i starts at the first file that starts at or after i / groups of the bytes, moved
    just enough that no run is empty. Returns [start, end) file index ranges, in order.
    """
    n = len(sizes)
    k = min(groups, n)
    weights = sizes if sum(sizes) else [1] * n
    starts = np.concatenate([[0], np.cumsum(weights)[:-1]])
    cuts = [0]
    for i in range(1, k):
        first = int(np.searchsorted(starts, sum(weights) * i / k, side="left"))
        cuts.append(min(max(first, cuts[-1] + 1), n - (k - i)))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def keep_fraction(
    spec: DatasetSpec, files: list[InputFile], config: DataConfig, tokenizer, dtype: np.dtype
) -> float:
    """The share f of a dataset's documents to keep for about its data.max_tokens tokens.

    f = max_tokens x bytes per token / the bytes of all its `files` (at most 1), bytes per
    token measured on whole files read in `file_order` until their cleaned documents hold
    min(max_tokens, PROBE_TOKENS) tokens. Bytes are the listed file sizes, compressed ones for
    .zst and Parquet, in the same units as the total. A dataset under max_tokens is read whole
    and gets f = 1. Raises DataError for an unreadable or malformed file read.
    """
    max_tokens = per_dataset(config.max_tokens, spec.name)
    read = tokens = 0
    with open(os.devnull, "wb") as sink:
        for i in file_order(spec.name, files):
            if tokens >= min(max_tokens, PROBE_TOKENS):
                break
            raw = read_file_documents(fetch_files(files[i].uri), spec, DocumentLimit.of(config))
            docs = [c[0] for c in (clean_document(r, config.min_chars) for r in raw) if c]
            tokens += sum(encode_documents(tokenizer, docs, 0, dtype, sink))
            read += files[i].size
    total = sum(f.size for f in files)
    return min(1.0, max_tokens * read / (tokens * total)) if tokens and total else 1.0


def plan_curation(
    config: DataConfig,
    out: str | Path,
    seed: int,
    tokenizer_dir: str | Path | None = None,
    groups: int | None = None,
    **manifest_fields,
) -> dict:
    """Write the curation plan artifact `out` (plan.json, tokenizer/, manifest last); return the plan.

    The plan lists every input file in config order, split into at most `groups` (default
    data.curate_groups) contiguous groups, and fixes the tokenizer: a copy of the base model's
    (`tokenizer_dir`) or a byte-level BPE trained on `tokenizer_sample`, and the keep fraction
    of each dataset with data.max_tokens (`keep_fraction`). `manifest_fields` pass through to
    the curated dataset's manifest.
    Raises DataError for missing/unreadable/binary/malformed inputs or an empty tokenizer
    sample, ModelError for an unusable base tokenizer; `out` is untouched on error.
    """
    start = time.perf_counter()
    files = [f for spec in config.all_specs for f in input_files(spec)]
    bounds = group_bounds([f.size for f in files], groups or config.curate_groups)
    sample_stats = None
    if tokenizer_dir is not None:
        tokenizer = load_base_tokenizer(Path(tokenizer_dir))
    else:
        candidates = set(config.names)
        texts = tokenizer_sample([f for f in files if f.dataset in candidates], config)
        if not texts:
            raise DataError(
                f"no document of at least data.min_chars={config.min_chars} characters in the "
                f"files sampled for the tokenizer (datasets {config.names}); check their paths "
                "and text_field"
            )
        tokenizer = train_tokenizer(texts, config.tokenizer.vocab_size)
        sample_stats = {"documents": len(texts), "chars": sum(len(t) for t in texts)}
    vocab = len(tokenizer)
    # Token ids run from 0 to vocab - 1.
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    keep = {
        spec.name: keep_fraction(
            spec, [f for f in files if f.dataset == spec.name], config, tokenizer, dtype
        )
        for spec in config.datasets
        if per_dataset(config.max_tokens, spec.name) is not None
    }
    plan = {
        "seed": seed,
        "data": config.model_dump(mode="json"),
        "vocab_size": vocab,
        "eos_token_id": int(tokenizer.eos_token_id),
        "dtype": dtype.name,
        "tokenizer_sample": sample_stats,
        "keep_fractions": keep,
        "manifest_fields": manifest_fields,
        "groups": [
            [{"dataset": f.dataset, "uri": f.uri, "size": f.size} for f in files[a:b]]
            for a, b in bounds
        ],
    }
    with staged_dir(out) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        atomic_write_json(tmp / PLAN_FILE, plan)
        write_manifest(tmp, PLAN_KIND, seconds=round(time.perf_counter() - start, 1))
    tokens = (
        f"tokenizer trained on {sample_stats['chars']:,} characters of "
        f"{sample_stats['documents']} documents"
        if sample_stats
        else f"tokenizer of {tokenizer_dir}"
    )
    kept = "".join(f", keeps {f:.2%} of {n}'s documents" for n, f in keep.items() if f < 1)
    log.info(
        f"curate plan: {len(files)} files in {len(bounds)} groups, {tokens}{kept}, "
        f"{time.perf_counter() - start:.1f} s"
    )
    return plan


def plan_sources(plan_dir: str | Path) -> dict[str, list[str]]:
    """{dataset or target name: its input paths as configured} of a curation plan: what a
    pipeline run read, shown with its dataset artifact (gs:// URIs for bucket data).

    Raises DataError for a missing, incomplete or corrupt plan.
    """
    data = read_plan(plan_dir)[0]["data"]
    return {spec["name"]: list(spec["paths"]) for spec in data["datasets"] + data["targets"]}


def read_plan(plan_dir: str | Path) -> tuple[dict, str]:
    """(plan, plan id: sha256 of plan.json) of a curation plan artifact, its files verified.

    Raises DataError for a missing, incomplete or corrupt plan.
    """
    manifest = read_manifest(plan_dir, kind=PLAN_KIND, verify=True)
    if PLAN_FILE not in manifest["files"]:
        raise DataError(f"{plan_dir}: the curation plan lists no {PLAN_FILE}; plan again")
    plan = json.loads((Path(plan_dir) / PLAN_FILE).read_text())
    return plan, manifest["files"][PLAN_FILE]["sha256"]
