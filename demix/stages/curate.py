"""Curation stages: the demo corpus, the curation fingerprint, curate in one task or as
plan -> groups -> merge (the fan-out the pipeline runs)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from demix.base_model import base_tokenizer_dir
from demix.config import RunConfig
from demix.data.curate import curate, curate_group, input_files, merge_groups, plan_curation
from demix.data.demo import fetch_demo
from demix.data.shards import CuratedData
from demix.errors import DataError
from demix.train.job import fingerprint


def fetch_configured_demo(config: RunConfig) -> None:
    """Fetch the embedded demo corpus when the config asks for it (cached after the first time)."""
    if config.data.fetch_demo:
        fetch_demo(Path(config.data.fetch_demo))


def curation_fingerprint(config: RunConfig, tokenizer_dir: Path | None) -> str:
    """Hash of what curation reads: the data settings (not the grouping, which does not change
    the result), the seed, the base tokenizer and each input file's path, size and stamp."""
    inputs = [(f.uri, f.size, f.stamp) for spec in config.data.all_specs for f in input_files(spec)]
    # Keys added later count only when set, so curations made before they existed stay valid.
    unset = {
        key
        for key, empty in (("max_tokens", None), ("targets", []), ("min_heldout_documents", 1))
        if getattr(config.data, key) == empty
    }
    data = config.data.model_dump(exclude={"curate_groups", *unset})
    for spec in (*data["datasets"], *data.get("targets", [])):
        if not spec["where"]:
            del spec["where"]
    return fingerprint(
        data=data,
        seed=config.seed,
        tokenizer=str(tokenizer_dir),
        inputs=inputs,
    )


def curate_stage(config: RunConfig, out: Path) -> CuratedData:
    """Curate the candidate datasets into `out` (plan, data.curate_groups groups and their merge,
    in this process); skipped when `out` holds this curation already, intact (a dataset changed
    since it was written is curated again).

    Dataset paths and `model.base` may be gs:// URIs (each file fetched when it is read).
    """
    fetch_configured_demo(config)
    tokenizer_dir = base_tokenizer_dir(config.model.base, config.model.trust_remote_code)
    fp = curation_fingerprint(config, tokenizer_dir)
    if (out / "manifest.json").is_file() and CuratedData(out).manifest.get("fingerprint") == fp:
        kept = CuratedData(out)
        with contextlib.suppress(DataError):  # changed since it was written: curated again
            kept.verify()
            return kept
    curate(config.data, out, config.seed, tokenizer_dir=tokenizer_dir, fingerprint=fp)
    return CuratedData(out)


def plan_curation_stage(config: RunConfig, out: Path) -> list[int]:
    """Curation's plan (input files in groups, the tokenizer) into `out`; returns the group ids."""
    fetch_configured_demo(config)
    tokenizer_dir = base_tokenizer_dir(config.model.base, config.model.trust_remote_code)
    fp = curation_fingerprint(config, tokenizer_dir)
    plan = plan_curation(config.data, out, config.seed, tokenizer_dir, fingerprint=fp)
    return list(range(len(plan["groups"])))


def curate_group_stage(plan: Path, group: int, out: Path) -> dict:
    """Curate one group of the plan into `out`; returns the group's manifest."""
    return curate_group(plan, group, out)


def merge_curation_stage(plan: Path, groups: list[Path], out: Path) -> CuratedData:
    """Merge the curated groups into the dataset artifact `out`."""
    merge_groups(plan, groups, out)
    return CuratedData(out)
