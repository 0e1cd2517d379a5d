"""Packaging: pyproject.toml applies without deprecation warnings and declares every package the
library imports (a package that is only installed as someone else's dependency may vanish)."""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
import warnings
from importlib.metadata import packages_distributions
from pathlib import Path

import setuptools
from packaging.requirements import Requirement
from packaging.version import Version
from setuptools.config.pyprojecttoml import apply_configuration, read_configuration
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = read_configuration(ROOT / "pyproject.toml", expand=False)  # the TOML as a dict


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def test_pyproject_applies_without_deprecation_warnings(monkeypatch):
    (wanted,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if _name(r) == "setuptools"]
    assert Version(setuptools.__version__) in wanted.specifier  # else this check would use another setuptools
    assert not any(Version(v) in wanted.specifier for v in ("68", "76.1"))  # older ones reject an SPDX license
    monkeypatch.chdir(ROOT)  # the readme and packages are found relative to the project
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "`project.license` as a TOML table is deprecated"
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"


def test_every_imported_package_is_declared():
    project = PYPROJECT["project"]
    declared = {_name(r) for r in project["dependencies"]}
    declared |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    distributions = packages_distributions()  # import name -> the installed distributions providing it
    imported = set()
    for file in sorted((ROOT / "src" / "gpt2lab").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = sorted(imported - set(sys.stdlib_module_names) - {"gpt2lab", "__future__"})
    assert "filelock" in third_party and "torch" in third_party  # the scan sees the imports
    undeclared = [m for m in third_party if not {_name(d) for d in distributions.get(m, [m])} & declared]
    assert undeclared == [], f"imported by src/gpt2lab but not in pyproject.toml's dependencies: {undeclared}"


def test_the_files_the_library_reads_ship_with_it():
    """Every non-Python file under src/gpt2lab that the library reads (its C++ kernel sources; not the
    developer notes) is package data, so a wheel holds it too, not only an editable install."""
    package = ROOT / "src" / "gpt2lab"
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["gpt2lab"]
    files = [p.relative_to(package).as_posix() for p in package.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".pyc", ".md")]  # fmt: skip
    assert {"csrc/bf16_gemv.cpp", "csrc/decode_attention.cpp"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
