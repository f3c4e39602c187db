"""The README and docs/ say what is true: the site builds offline with no broken link, every
relative link and anchor exists, and every command a bash block names (make targets,
`python pipeline.py ...`, `demix ...`) exists with every flag it passes."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def _slug(title: str) -> str:
    from markdown.extensions.toc import slugify  # what mkdocs' table of contents uses

    return slugify(re.sub(r"[`*]", "", title), "-")


@functools.cache
def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.+?)\s*$", text, re.M)}


def test_the_site_builds_offline_with_no_broken_link(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "index.html").is_file() and (tmp_path / "results" / "index.html").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: link to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: link to {target}: no such heading"


def _commands(text: str) -> list[list[str]]:
    """Each command line of the bash blocks (continuations joined), as words."""
    found = []
    for block in BLOCK.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                found.append(shlex.split(line.replace("[", " ").replace("]", " ")))
    return found


@functools.cache
def _help(*command: str) -> str:
    done = subprocess.run([*command, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} --help failed: {done.stderr[-500:]}"
    return done.stdout


def _check_flags(words: list[str], command: tuple[str, ...], where: str) -> None:
    usage = _help(*command)
    for word in words:
        flag = word.split("=", 1)[0]
        if flag.startswith("--"):
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", usage), f"{where}: {flag}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_in_a_bash_block_exists_with_its_flags(page):
    makefile = (ROOT / "Makefile").read_text()
    demix = str(Path(sys.executable).with_name("demix"))
    for words in _commands(page.read_text()):
        where = f"{page.name}: {' '.join(words)}"
        if words[0] == "make":
            for target in (w for w in words[1:] if "=" not in w and not w.startswith("-")):
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), where
        elif words[:2] == ["python", "pipeline.py"] and len(words) > 2:
            _check_flags(words[3:], (sys.executable, "pipeline.py", words[2]), where)
        elif Path(words[0]).name == "demix" and len(words) > 1 and not words[1].startswith("-"):
            sub = words[1:3] if words[1] == "data" else words[1:2]
            _check_flags(words[len(sub) + 1 :], (demix, *sub), where)
