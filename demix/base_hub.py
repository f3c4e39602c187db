"""Hugging Face hub ids as `model.base` (ORG/NAME[@REVISION]): fetched with huggingface_hub
when the hub is reachable, refused in one line when it is not (demix.base_model uses this);
`base_form` tells the three forms of a `model.base` apart (below the config, which checks it)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from demix.errors import ConfigError, DataError

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "ON", "YES", "TRUE"}
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^({_HUB_PART})/({_HUB_PART})(?:@([A-Za-z0-9][A-Za-z0-9._/-]*))?$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
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


def base_form(spec: str) -> str:
    """'local', 'gcs' or 'hub': the form of a `model.base` value.

    A relative path of two parts (`org/name`) is a hub id unless such a folder exists here:
    write `./org/name` for a local folder of that shape.
    Raises ConfigError (one line) for an empty value, surrounding blanks or control characters,
    a scheme other than gs://, a gs:// URI without a valid bucket and path, or a hub id with an
    empty or malformed revision.
    """
    from demix.storage import split_gs

    where = f"model.base {spec!r}"
    if not spec or spec != spec.strip() or not spec.isprintable():
        raise ConfigError(f"{where}: give a folder, a gs:// URI or a hub id ORG/NAME[@REVISION]")
    scheme = _SCHEME.match(spec)
    if scheme:
        if scheme.group(1) != "gs":
            raise ConfigError(
                f"{where}: unknown scheme {scheme.group(1)}://; give a local folder, /gcs/... "
                "or gs://BUCKET/PATH of a Hugging Face model folder, or a hub id ORG/NAME"
            )
        try:
            split_gs(spec)
        except DataError as err:
            raise ConfigError(f"model.base {err}") from None
        return "gcs"
    if spec.startswith(("/", "./", "../", "~")) or Path(spec).exists():
        return "local"
    if _HUB_ID.match(spec):
        return "hub"
    if "@" in spec and spec.count("/") == 1:
        raise ConfigError(
            f"{where}: not a hub id; write ORG/NAME or ORG/NAME@REVISION (a branch, tag or "
            "commit), or ./PATH for a local folder"
        )
    return "local"
