"""The package's import graph, read from the sources (every import statement, lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "gpt2lab"


def module_file(module: str) -> Path:
    """``gpt2lab.model`` -> src/gpt2lab/model.py (``gpt2lab`` -> its ``__init__.py``)."""
    return PKG / "__init__.py" if module == "gpt2lab" else PKG / f"{module.split('.', 1)[1].replace('.', '/')}.py"


def imported_modules(path: Path) -> set[str]:
    """The gpt2lab modules ``path`` imports anywhere in its code (module level, functions, classes)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "gpt2lab"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gpt2lab":
            if node.module == "gpt2lab":  # `from gpt2lab import x`: a submodule, or a name of the package
                subs = {f"gpt2lab.{a.name}" for a in node.names if module_file(f"gpt2lab.{a.name}").exists()}
                found |= subs or {"gpt2lab"}
            else:
                found.add(node.module)
    return found


def closure(script: Path, prune: frozenset[str] = frozenset()) -> set[str]:
    """Every gpt2lab module that importing ``script`` can load, the package itself included.

    Modules in ``prune`` are left out and not followed.
    """
    seen: set[str] = set()
    todo = [m for m in imported_modules(script)]
    while todo:
        module = todo.pop()
        for name in ("gpt2lab", module):  # importing a submodule runs the package's __init__ first
            if name not in seen and name not in prune:
                seen.add(name)
                todo.extend(imported_modules(module_file(name)))
    return seen


def short(module: str) -> str:
    return "__init__" if module == "gpt2lab" else module.split(".", 1)[1]
