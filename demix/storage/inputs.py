"""Never write over an input: an output path equal to, inside, or holding an input path is
refused before any work (local paths after resolving symbolic links; gs:// URIs by their
object-name prefixes)."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from demix.errors import DataError
from demix.storage.uris import is_remote


def _resolved(uri: str | Path) -> tuple[str, PurePosixPath]:
    """(where, path) comparable across arguments: ("gs", bucket/key) or ("local", real path)."""
    if is_remote(uri):
        return "gs", PurePosixPath(str(uri)[len("gs://") :].rstrip("/"))
    text = str(uri)
    if glob.has_magic(text):  # a pattern: the folder it lists is the input
        text = text[: min(text.index(c) for c in "*?[" if c in text)]
        text = text if text.endswith(os.sep) else os.path.dirname(text)
    return "local", PurePosixPath(os.path.realpath(text or "."))


def check_not_inputs(outputs: Iterable, inputs: Iterable[str | Path]) -> None:
    """Refuse outputs (Output values) that are, hold, or lie inside one of `inputs`.

    Raises DataError naming both paths before anything is written.
    """
    resolved = [(uri, *_resolved(uri)) for uri in inputs if uri]
    for output in outputs:
        where, out = _resolved(output.uri)
        for uri, kind, path in resolved:
            if kind != where:
                continue
            if out == path:
                how = "is"
            elif path.is_relative_to(out):
                how = "holds"
            elif out.is_relative_to(path):
                how = "lies inside"
            else:
                continue
            raise DataError(
                f"{output.uri}: the output {how} the input {uri}; writing it would destroy what "
                "the command reads: give another output path"
            )
