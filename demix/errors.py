"""Errors a user can fix. The CLI prints their message as one line and exits with code 2."""

import os
import sys
import traceback


class DemixError(Exception):
    """Bad input: the message names what is wrong, where, and how to fix it."""

    exit_code = 2


class ConfigError(DemixError):
    """A run config that does not validate."""


class DataError(DemixError):
    """A dataset path, file or record that cannot be used."""


class MixtureError(DemixError):
    """Mixture weights that are not a point of the simplex over the known datasets."""


class ModelError(DemixError):
    """A model folder that cannot be loaded safely or does not match the others."""


class TaskError(DemixError):
    """An evaluation task that does not exist or has no documents."""


class FetchError(DemixError):
    """Demo data that cannot be fetched from the package registries."""


class SearchError(DemixError):
    """A scores table that cannot be read or belongs to another search, or nothing to select."""


class ServiceError(DemixError):
    """A pipeline service that cannot be reached or refuses a request: the message names the
    host (or project and region) and what to check."""


# The error contract of the `demix` command (demix.cli.main):
#   0  done;
#   2  bad input: a DemixError, or an error about an input that no demix code turned into one
#      (`describe_input_error`), printed as one line `demix: error: ...`;
#   3  internal error (a bug): one line `demix: internal error: ...` with a hint to rerun with
#      --debug, which prints the traceback as well;
#   130 interrupted.
INTERNAL_EXIT_CODE = 3

# Error types these libraries define are about what they were given to read (a weights file, a
# tokenizer, YAML, a template, a task or its dataset), not about demix's own state.
INPUT_LIBRARIES = {
    "safetensors": "not a readable safetensors file",
    "tokenizers": "tokenizer",
    "yaml": "not valid YAML",
    "jinja2": "template error",
    "lm_eval": "lm-eval",
    "datasets": "dataset",
}


def one_line(text: str) -> str:
    """`text` on one line: its lines joined, runs of whitespace made one space."""
    return " ".join(str(text).split())


def _mark(mark) -> str:
    """'name:line:column' of a YAML mark (1-based)."""
    return f"{mark.name}:{mark.line + 1}:{mark.column + 1}"


def describe_input_error(err: BaseException) -> str | None:
    """The one-line message of an error about an input that no demix code turned into a
    DemixError, naming the file (and line or offset) where the error knows it; None for
    anything else, which is a bug (an internal error)."""
    import json

    if isinstance(err, json.JSONDecodeError):
        return f"not valid JSON at line {err.lineno} column {err.colno} ({err.msg})"
    if isinstance(err, UnicodeDecodeError):
        return (
            f"input is not {err.encoding} text (bad byte at offset {err.start}: {err.reason}); "
            "convert it to UTF-8"
        )
    if isinstance(err, UnicodeError):
        return f"text cannot be encoded ({one_line(err)}); remove or replace the character"
    if isinstance(err, OSError):
        if err.filename is not None:
            where = str(err.filename) + (f" -> {err.filename2}" if err.filename2 else "")
            return f"{where}: {err.strerror or one_line(err)}"
        return f"{type(err).__name__}: {one_line(err) or 'operating system error'}"
    library = type(err).__module__.split(".")[0]
    if library not in INPUT_LIBRARIES:
        return None
    what = INPUT_LIBRARIES[library]
    if library == "yaml" and getattr(err, "problem_mark", None) is not None:
        return f"{_mark(err.problem_mark)}: {what} ({one_line(err.problem)})"
    lineno = getattr(err, "lineno", None)
    source = getattr(err, "filename", None) or getattr(err, "name", None)
    if library == "jinja2" and source and lineno:
        return f"{source}:{lineno}: {what} ({one_line(getattr(err, 'message', err))})"
    return f"{what} ({one_line(err) or type(err).__name__})"


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, with an article: "null", "a number", "an array"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    return "an object" if isinstance(value, dict) else "a string"


def process_rank() -> int:
    """This process's rank among training processes (0 when not launched)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def report_error(err: Exception, debug: bool = False, program: str = "demix") -> int:
    """Print `err` as the error contract says and return the exit code; `program` names the
    command in the line (`demix`, `pipeline.py`, ...: every front door shares this contract).

    Bad input (a DemixError, or a library's error about an input) is one line `demix: error:`,
    printed by rank 0 only: every training process would print the same line. Anything else is
    a bug: one line `demix: internal error:` from every process that hits it (it may be one
    rank's alone), with the traceback under --debug.
    """
    rank = process_rank()
    if debug and (rank == 0 or not isinstance(err, DemixError)):
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, DemixError):
        message, code = str(err), err.exit_code
    else:
        message, code = describe_input_error(err), 2
    if message is not None:
        if rank == 0:
            print(f"{program}: error: {one_line(message)}", file=sys.stderr)
        return code
    who = "" if rank == 0 else f" (rank {rank})"
    hint = "" if debug else " (rerun with --debug for the traceback)"
    detail = one_line(err)[:500] or "no message"
    print(f"{program}: internal error{who}: {type(err).__name__}: {detail}{hint}", file=sys.stderr)
    return INTERNAL_EXIT_CODE
