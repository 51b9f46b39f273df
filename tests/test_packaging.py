"""The pins are stated once per file format; they must agree, and torchvision must never appear."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(text: str) -> dict[str, str]:
    return {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r"^[\s-]*([A-Za-z0-9_.\-]+)==([^\s#]+)", text, re.M)}


def test_environment_yml_matches_requirements():
    req = _pins((ROOT / "requirements/core.txt").read_text() + (ROOT / "requirements/dev.txt").read_text())
    env = _pins((ROOT / "environment.yml").read_text())
    assert req == env


def test_torchvision_never_required():
    for f in ["pyproject.toml", "environment.yml", "requirements/core.txt", "requirements/dev.txt"]:
        lines = [l for l in (ROOT / f).read_text().splitlines() if not l.strip().startswith("#")]
        assert not any("torchvision" in l for l in lines), f


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
