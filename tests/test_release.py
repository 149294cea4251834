"""The release's version is one number: pyproject, ``__version__``, the CLI and the CHANGELOG agree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import entropy_reg

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_same_everywhere():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert entropy_reg.__version__ == declared
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(declared)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), "no CHANGELOG section"


def test_cli_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "entropy_reg.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"entropy-reg {entropy_reg.__version__}"


def test_readme_python_blocks_run():
    """Every complete Python block of the README runs, in order, in one namespace (as a reader pastes them)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    complete = [b for b in blocks if "..." not in b]  # a block with ... is a template (the TRL call)
    assert len(complete) >= 2
    scope: dict = {}
    for block in complete:
        exec(compile(block, "README.md", "exec"), scope)
