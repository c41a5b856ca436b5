"""The documents the project carries: they parse, they point at each other,
and none cites a document outside the repository."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
DOCS = [PROJECT / "README.rst", *sorted((PROJECT / "docs").glob("*.rst"))]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_rst_parses_without_warnings(path: Path) -> None:
    docutils = pytest.importorskip("docutils.core")
    warnings = io.StringIO()
    docutils.publish_doctree(path.read_text(), settings_overrides={
        "warning_stream": warnings, "report_level": 2, "halt_level": 5})
    assert warnings.getvalue() == "", warnings.getvalue()


def test_readme_points_to_the_design_contract() -> None:
    readme = (PROJECT / "README.rst").read_text()
    assert "docs/design.rst" in readme and (PROJECT / "docs" / "design.rst").exists()
    assert "scripts/demo" in readme and "scripts/test" in readme


def test_no_file_cites_a_document_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True,
                           check=False).stdout.split()
    if not files:
        files = [str(p.relative_to(PROJECT)) for p in PROJECT.rglob("*")
                 if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts]
    cited = []
    for name in files:
        path = PROJECT / name
        if path.suffix not in (".py", ".rst", ".conf", ".cfg", ".toml", ".service", ".timer",
                               ".md", "") or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        for needle in ("DESIGN.md", "../shared/"):
            if needle in text and name != "tests/test_docs.py":
                cited.append(f"{name}: {needle}")
    assert cited == []
