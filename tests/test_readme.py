"""The README's two commands are the ones CI and users actually run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_starts_with_install_and_run_then_install_and_test():
    first, second = _commands()[:2]
    assert first.startswith("pip install torch==2.13.0") and "sglp-llm prune" in first
    assert second.startswith("pip install torch==2.13.0") and second.endswith("python -m pytest -q -n 2")


def test_ci_runs_the_readme_test_command():
    test_command = _commands()[1].rsplit("&& ", 1)[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
    assert "pip install --quiet torch==2.13.0" in (ROOT / ".ci" / "run").read_text()
