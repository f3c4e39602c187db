"""Hugging Face hub ids as `model.base` (ORG/NAME[@REVISION]): fetched with huggingface_hub
when the hub is reachable, refused in one line when it is not (demix.base_model uses this)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from demix.errors import ConfigError

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}
OFFLINE = "the hub is offline here (HF_HUB_OFFLINE=1; 0 lets demix use it where it is reachable)"


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off here (HF_HUB_OFFLINE, as huggingface_hub
    reads it; the demix command sets it to 1 unless it is set)."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def offline_error(spec: str, why: str) -> ConfigError:
    """The one-line refusal of a hub id the hub cannot give here, saying what to give instead."""
    return ConfigError(
        f"model.base {spec!r} is a Hugging Face hub id (no such folder here) but {why}: "
        f"download the model where the hub is reachable (`hf download "
        f"{spec.partition('@')[0]} --local-dir DIR`) and give model.base as that folder or a "
        "gs:// URI of it"
    )


_HUB_FETCHED: dict[str, tuple[Path, str]] = {}  # per process: one hub request per hub id


def fetch_hub(spec: str, cache: Path, patterns: tuple[str, ...]) -> tuple[Path, str]:
    """(snapshot folder, resolved commit) of the hub id `spec`: its top-level files matching
    `patterns` downloaded into `cache` once (and resolved once per process: a run uses one
    commit throughout).

    Raises ConfigError when the hub is offline or unreachable, or the model, revision or
    access is refused by the hub.
    """
    repo, _, revision = spec.partition("@")
    if hub_offline():
        raise offline_error(spec, OFFLINE)
    if spec in _HUB_FETCHED and _HUB_FETCHED[spec][0].is_dir():
        return _HUB_FETCHED[spec]
    import huggingface_hub
    from huggingface_hub import errors

    try:
        folder = huggingface_hub.snapshot_download(
            repo,
            revision=revision or None,
            cache_dir=cache,
            allow_patterns=list(patterns),
            ignore_patterns=["*/*"],
        )
    except errors.GatedRepoError:
        raise ConfigError(
            f"model.base {spec!r}: the model is gated on the hub; accept its terms and log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise ConfigError(f"model.base {spec!r}: no such model on the hub (or no access)") from None
    except errors.RevisionNotFoundError:
        raise ConfigError(f"model.base {spec!r}: no revision {revision!r} of {repo}") from None
    except Exception as err:  # noqa: BLE001 (connection, offline, HTTP: one line, not a traceback)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise offline_error(spec, f"the hub cannot be reached ({reason})") from None
    folder = Path(folder)
    commit = folder.name if _COMMIT.match(folder.name) else revision or "main"
    _HUB_FETCHED[spec] = (folder, commit)
    return folder, commit
