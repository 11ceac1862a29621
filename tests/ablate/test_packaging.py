"""pyproject.toml states version ranges, constraints.txt pins what CI passed with, and the two agree."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
BOUNDED = {"numpy", "pandas", "pyarrow", "scipy", "statsmodels", "pydantic", "typer", "ray", "optuna", "rich",
           "pyyaml"}


def _pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = ver
    return out


def _requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra, rs in PROJECT["optional-dependencies"].items():
        reqs += [Requirement(r) for r in rs]
    return reqs


def test_core_dependencies_have_ranges():
    for r in map(Requirement, PROJECT["dependencies"]):
        name = r.name.lower()
        if name in BOUNDED:
            ops = {s.operator for s in r.specifier}
            assert ops & {">=", "~="} and ops & {"<", "<=", "~=", "=="}, f"{r}: give a lower and an upper bound"


def test_ray_and_optuna_ranges_are_the_verified_minor_and_major():
    deps = {Requirement(r).name.lower(): Requirement(r) for r in PROJECT["dependencies"]}
    assert deps["ray"].specifier.contains("2.60.0") and not deps["ray"].specifier.contains("2.61.0")
    assert deps["optuna"].specifier.contains("5.0.0") and not deps["optuna"].specifier.contains("6.0.0")


def test_extras():
    extras = PROJECT["optional-dependencies"]
    assert {"report", "cluster", "fa4", "test"} <= set(extras)
    assert any(Requirement(r).name == "matplotlib" for r in extras["report"])
    assert any(Requirement(r).name == "ray" and "default" in Requirement(r).extras for r in extras["cluster"])


def test_constraints_pin_versions_inside_the_ranges():
    pins = _pins()
    assert "torch" not in pins, "torch is pinned on the install line (CPU vs CUDA build), not in constraints.txt"
    for r in _requirements():
        name = re.sub(r"[-_.]+", "-", r.name).lower()
        if name in ("torch", "flash-attn-4", "optuna-dashboard"):
            continue
        assert name in pins, f"constraints.txt has no pin for {r.name}: regenerate it (.ci/freeze_constraints.py)"
        assert r.specifier.contains(Version(pins[name]), prereleases=True), \
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {r}"


def test_ci_and_readme_install_with_the_constraints():
    ci = (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text().splitlines()[:6]
    cmd = 'pip install torch==2.13.0 -c constraints.txt -e ".[test]" && python -m pytest'
    assert cmd in ci and any(cmd in line for line in readme)
