"""Curation: read candidate datasets, clean, dedupe, split, tokenize and pack token streams.

Three steps, the same in one process (`curate`) and fanned out over KFP tasks:

- plan (`plan_curation`): list the input files, split them into contiguous groups, and decide
  the tokenizer (a base model's, or a BPE trained on a bounded sample) before anything is
  tokenized;
- map (`curate_group`, one per group): clean, drop short documents, dedupe within the group,
  tokenize; keeps each document's tokens, length and content hash;
- reduce (`merge_groups`): merge the groups in file order, drop duplicates across groups (the
  first kept), pick held-out documents per dataset and write the `demix.dataset` artifact:
  tokenizer/, <name>/train.bin, <name>/heldout.bin (every document followed by eos) and
  manifest.json last, with token counts per dataset (the prior).

Targets (`data.targets`) go through the same steps after the candidates, so a target document
that repeats a candidate's is dropped from the target; every kept target document is held out
(<target>/heldout.bin, an empty train.bin) and the manifest lists targets apart from the
candidate datasets, outside the prior. The tokenizer sample is drawn from the candidates only.

With `data.max_tokens`, a dataset larger than that is curated from a sample of its documents:
the plan fixes a keep fraction f per dataset (`keep_fraction`, from the bytes per token of a
few of its files), each group keeps a document when the first 8 bytes of its content hash, as
an integer, are under f x 2^64, and every other document is read, cleaned and hashed but not
tokenized or stored. The choice depends on the document alone, never on grouping or file
order, so repeats share it and deduplication is as without the sample: a document left out
still removes its later repeats, in its own dataset and in the datasets after it, whose
documents are then exactly what they are without max_tokens. Held-out documents are chosen
among the kept ones. The token prior counts the whole dataset, estimated as its kept tokens /
f (each document is kept with probability f whatever its length, so the estimate is unbiased;
its relative error is about sqrt((1 - f) / kept documents) for documents of similar length),
held-out tokens subtracted as they are from a counted dataset; the manifest records both
counts (see merge_groups).

Groups are contiguous runs of the files in config order, so the result does not depend on how
many there are. Reading and normalizing documents live in `demix.data.sources`, the tokenizer
in `demix.data.tokenizer`. The plan lives in `demix.data.curate_plan`, the reduce in
`demix.data.curate_reduce`; the map (`curate_group`) and the three in one process (`curate`)
here, and every name is imported from this module.
"""

from __future__ import annotations

import glob
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from demix.config import DataConfig
from demix.data.curate_plan import GROUP_KIND, group_bounds, plan_curation, read_plan
from demix.data.curate_reduce import heldout_indices, merge_groups
from demix.data.lines import DocumentLimit, OversizeCount, oversize_counts
from demix.data.sources import (
    clean_document,
    dataset_files,
    input_files,
    normalize,
    read_documents,
    read_file_documents,
)
from demix.data.tokenizer import (
    encode_documents,
    tokenizer_sample,
    train_tokenizer,
)
from demix.errors import DataError
from demix.progress import progress, track
from demix.storage import (
    fetch_files,
    staged_dir,
    write_manifest,
)
from demix.storage.files import is_stale, owner_tag

# dataset_files, input_files, normalize, read_documents (sources) and tokenizer_sample,
# train_tokenizer (tokenizer) are re-exported: callers import them from here too.
__all__ = [
    "curate",
    "curate_group",
    "dataset_files",
    "group_bounds",
    "heldout_indices",
    "input_files",
    "merge_groups",
    "normalize",
    "plan_curation",
    "read_documents",
    "read_plan",
    "tokenizer_sample",
    "train_tokenizer",
]


log = logging.getLogger(__name__)


# ---------------------------------------------------------------- map


def curate_group(plan_dir: str | Path, index: int, out: str | Path) -> dict:
    """Curate group `index` of a plan into the artifact `out`; return its manifest.

    Per dataset of the group: <name>/tokens.bin (each kept document's tokens and eos, in file
    order), <name>/lengths.bin (int64 tokens per document), <name>/hashes.bin (the 32-byte
    sha256 of each document's normalized text) and <name>/left_out.bin (the hashes of the
    documents the plan's keep fraction leaves out, never tokenized). Documents shorter than
    data.min_chars and repeats within the group (of any dataset, left out or not) are dropped
    and counted, and so are documents over data.max_document_bytes skipped or truncated
    (oversize_skipped, oversize_truncated; only when there are any).
    Raises DataError for an unknown group, an input that changed since the plan was made, or
    an unreadable/binary/malformed file; `out` is untouched on error.
    """
    start = time.perf_counter()
    plan, plan_id = read_plan(plan_dir)
    if not 0 <= index < len(plan["groups"]):
        raise DataError(
            f"{plan_dir}: no group {index}; the curation plan has groups 0-{len(plan['groups']) - 1}"
        )
    config = DataConfig.model_validate(plan["data"])
    specs = {spec.name: spec for spec in config.all_specs}
    from demix.model import load_tokenizer

    tokenizer = load_tokenizer(Path(plan_dir) / "tokenizer")
    eos, dtype = int(plan["eos_token_id"]), np.dtype(plan["dtype"])
    files = plan["groups"][index]
    keep = plan.get("keep_fractions", {})
    limit = DocumentLimit.of(config)
    seen: set[bytes] = set()
    stats: dict[str, dict] = {}
    bar = progress(sum(f["size"] for f in files), f"curate group {index}", "B")
    with bar, staged_dir(out) as tmp:
        for name in dict.fromkeys(f["dataset"] for f in files):
            (tmp / name).mkdir()
            docs, short, dups, left, lengths = 0, 0, 0, 0, []
            oversize = OversizeCount()
            threshold = int(keep.get(name, 1.0) * 2**64)  # kept: hash[:8] under it
            with (
                open(tmp / name / "tokens.bin", "wb") as tokens,
                open(tmp / name / "hashes.bin", "wb") as hashes,
                open(tmp / name / "left_out.bin", "wb") as left_out,
            ):
                for entry in (f for f in files if f["dataset"] == name):
                    path = fetch_files(entry["uri"])
                    size = path.stat().st_size if path.is_file() else None
                    if size != entry["size"]:
                        raise DataError(
                            f"{entry['uri']}: {'missing' if size is None else f'{size} bytes'}, "
                            f"{entry['size']} bytes when the curation plan was made; an input "
                            "changed during curation, curate again"
                        )
                    kept: list[str] = []
                    for raw in read_file_documents(path, specs[name], limit, oversize):
                        cleaned = clean_document(raw, config.min_chars)
                        if cleaned is None:
                            short += 1
                        elif cleaned[1] in seen:
                            dups += 1
                        elif int.from_bytes(cleaned[1][:8], "big") >= threshold:
                            seen.add(cleaned[1])
                            left_out.write(cleaned[1])
                            left += 1
                        else:
                            seen.add(cleaned[1])
                            kept.append(cleaned[0])
                            hashes.write(cleaned[1])
                    lengths += encode_documents(tokenizer, kept, eos, dtype, tokens)
                    docs += len(kept)
                    bar.update(entry["size"])
            np.asarray(lengths, dtype="<i8").tofile(tmp / name / "lengths.bin")
            stats[name] = {
                "documents": docs,
                "dropped_short": short,
                "duplicates_removed": dups,
                "left_out": left,
                "tokens": int(sum(lengths)),
                **oversize_counts(oversize),
            }
        manifest = write_manifest(
            tmp,
            GROUP_KIND,
            plan=plan_id,
            group=index,
            datasets=stats,
            seconds=round(time.perf_counter() - start, 1),
        )
    log.info(
        f"curate group {index + 1}/{len(plan['groups'])}: {len(files)} files, "
        f"{sum(s['documents'] for s in stats.values())} documents, "
        f"{sum(s['tokens'] for s in stats.values()):,} tokens, {manifest['seconds']:.1f} s"
    )
    return manifest


# ---------------------------------------------------------------- in one process


def curate(
    config: DataConfig,
    out: str | Path,
    seed: int,
    tokenizer_dir: str | Path | None = None,
    groups: int | None = None,
    **manifest_fields,
) -> dict:
    """Curate `config.datasets` (and `config.targets`) into the artifact folder `out`; return its
    manifest.

    Plan, every group and the merge in this process, with the plan and groups in a temporary
    folder beside `out`. Cleaning (`normalize`): lone surrogates replaced by U+FFFD, NFC, unix
    newlines, trailing spaces stripped; documents shorter than config.min_chars dropped; exact
    duplicates (sha256 of the normalized text) removed within and across datasets, the first in
    config order kept. With `tokenizer_dir` (a base model) its tokenizer is copied, else a
    byte-level BPE is trained on a sample.
    `groups` (default data.curate_groups) does not change the result.
    Raises DataError for missing/unreadable/binary/malformed inputs and for a dataset that is
    empty after cleaning, ModelError for an unusable base tokenizer; `out` is untouched on error.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = f".{out.name}.curate-"
    for stale in out.parent.glob(f"{glob.escape(scratch)}*"):  # left by a killed run
        if is_stale(stale.name[len(scratch) :]):  # another live run's is its own
            shutil.rmtree(stale, ignore_errors=True)
    mine = f"{scratch}{owner_tag()}."  # this process's: only it removes its scratch
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=mine) as work:
        plan_dir = Path(work) / "plan"
        plan = plan_curation(config, plan_dir, seed, tokenizer_dir, groups, **manifest_fields)
        group_dirs = [Path(work) / f"group-{i}" for i in range(len(plan["groups"]))]
        for index, folder in enumerate(track(group_dirs, "curate", "group")):
            curate_group(plan_dir, index, folder)
        return merge_groups(plan_dir, group_dirs, out)
