"""Counters the reliability tests record as they run; conftest prints them as a table.

Every number in the table comes from a test that ran in this session: a kill that was
survived, a fault the proxy injected, a bad input that was refused. `intact` records each
integrity check before asserting it, so a lost or corrupt artifact shows in the table too.
"""

from __future__ import annotations

from collections import Counter

COUNTS: Counter = Counter()

ROWS = (
    ("kills", "processes killed with SIGKILL mid-run, rerun to an identical result"),
    ("faults_injected", "GCS faults injected (503/429/500, dropped connections, flipped bytes)"),
    ("faults_retried", "  retried until the transfer succeeded"),
    ("faults_fatal", "  outlasted the retry deadline: publish failed, never read as complete"),
    ("corruption_refused", "  flipped bytes that reached the reader: download refused"),
    ("tampered_refused", "published artifacts tampered with afterwards, refused on read"),
    ("tamper_unlisted", "  a file or symlink the manifest does not list (weights, tokenizer)"),
    ("tamper_changed", "  a listed file missing, resized, flipped, swapped or linked outside"),
    ("tamper_paths", "  manifest paths absolute or leaving the folder (files, tokenizer)"),
    ("tamper_fields", "  manifest fields of a wrong type or value (dataset, model, checkpoint)"),
    ("bad_inputs", "bad inputs refused with one line, exit 2, nothing written"),
    ("outputs_refused", "output paths holding what demix did not write: refused, untouched"),
    ("outputs_removed", "failed commands: the output folders they created removed again"),
    ("second_writers", "second writers of an output refused naming the holder, first unharmed"),
    ("appeared_kept", "what appeared at an output mid-run: kept as it was, command refused"),
    ("stale_locks", "locks of killed commands taken over"),
    ("inputs_kept", "outputs equal to, inside or holding an input refused before any work"),
    ("exports_refused", "exports over a user's file or of a mixture off the simplex refused"),
    ("user_files_kept", "user files planted at output paths, kept byte for byte (all tests)"),
    ("fuzz_jsonl", "fuzzed inputs parsed or refused with one line, none crashed: JSONL files"),
    ("fuzz_mixtures", "  mixtures (--mixture: name=w lists, JSON, files)"),
    ("fuzz_configs", "  run configs (YAML text and parsed values)"),
    ("fuzz_overrides", "  --set overrides"),
    ("fuzz_safetensors", "  safetensors files (each one accepted also loads in the library)"),
    ("fuzz_manifests", "  artifact manifests"),
    ("size_bombs", "size bombs (schema bounds, memory plans) refused before allocating"),
    ("decompression_bombs", "documents over data.max_document_bytes (gzip bomb too) refused"),
    ("integrity_checks", "artifact integrity checks"),
    ("artifacts_lost", "artifacts lost or corrupt artifacts accepted"),
)


def count(key: str, n: int = 1) -> None:
    """Add n to a counter of the reliability table."""
    COUNTS[key] += n


def intact(ok: bool, what: str) -> None:
    """Record one integrity check (a failure counts as an artifact lost), then assert it."""
    COUNTS["integrity_checks"] += 1
    if not ok:
        COUNTS["artifacts_lost"] += 1
    assert ok, what


def table() -> list[str]:
    """The table's lines, or none when no reliability test ran."""
    if not any(COUNTS[key] for key, _ in ROWS):
        return []
    width = max(len(label) for _, label in ROWS)
    lines = [f"{'what':<{width}}  count", f"{'-' * width}  -----"]
    lines += [f"{label:<{width}}  {COUNTS[key]:>5}" for key, label in ROWS]
    return lines
