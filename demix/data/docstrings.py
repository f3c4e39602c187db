"""Documentation text from a Python package's docstrings: prose with code examples.

Used by the demo corpus (demix.data.demo) for a target that sits between its candidates: the
docstrings of a scientific library explain in English, show code (doctest examples) and state
mathematics, so no single candidate (general English, code, math) matches it.
"""

from __future__ import annotations

import ast
import zipfile

MIN_DOCSTRING_CHARS = 200  # shorter docstrings are one-line summaries, not documentation
MIN_DOCUMENT_CHARS = 500


def module_documentation(source: str) -> str:
    """A module's documentation: its docstring, then each documented class's and function's
    (`name`, blank line, docstring), in source order; "" when it has none or does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    module = ast.get_docstring(tree)
    if module:
        parts.append(module)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                parts.append(f"{node.name}\n\n{doc}")
    return "\n\n".join(parts)


def docstring_documents(wheel: zipfile.ZipFile, package: str) -> list[dict]:
    """One document per module of `package` in a wheel (tests left out) with at least
    MIN_DOCUMENT_CHARS of documentation, in path order: {"text", "source": "<package>/<path>"}."""
    docs = []
    for name in sorted(wheel.namelist()):
        parts = name.split("/")
        if parts[0] != package or not name.endswith(".py") or "tests" in parts:
            continue
        text = module_documentation(wheel.read(name).decode("utf-8", errors="replace"))
        if len(text) >= MIN_DOCUMENT_CHARS:
            docs.append({"text": text, "source": name})
    return docs
