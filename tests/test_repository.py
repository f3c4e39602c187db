"""What a user and a packager find at the top of the repository: the license pyproject
declares, and a citation that names this version."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _version() -> str:
    return re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def test_the_license_file_is_the_license_pyproject_declares():
    assert re.search(r'^license = "Apache-2.0"', (ROOT / "pyproject.toml").read_text(), re.M)
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a pointer to it


def test_the_citation_names_this_version_and_the_paper():
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0"
    assert str(citation["version"]) == _version()
    paper = citation["preferred-citation"]
    assert {"type": "doi", "value": "10.48550/arXiv.2602.00747"} in paper["identifiers"]
    assert all(a["family-names"] and a["given-names"] for a in paper["authors"])
