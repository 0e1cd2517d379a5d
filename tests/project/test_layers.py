"""The package's imports point one way: down the layers of src/gpt2lab/README.md, never in a circle."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.project.imports import PKG, ROOT, imported_modules, module_file, short

# The table of src/gpt2lab/README.md.
LAYERS = {
    0: ("errors", "fileio", "presets", "params", "stage"),
    1: ("model", "kernels", "quantize", "lora", "generate", "devices"),
    2: ("fetch", "checkpoint", "convert", "weights", "tokenizer", "dataset", "batching"),
    3: ("classifier", "classifier_io", "inference", "resume", "distributed", "train", "evaluate", "plots", "textgen"),
    4: ("tracking", "registry", "basestore", "serving", "serving_model", "server", "smoke", "export", "cli"),
}
LAYER = {name: layer for layer, names in LAYERS.items() for name in names}
MODULES = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
TORCH_FREE = LAYERS[0]


def _graph() -> dict[str, set[str]]:
    return {m: {short(d) for d in imported_modules(PKG / f"{m}.py")} - {"__init__", m} for m in MODULES}


def test_every_module_has_a_layer() -> None:
    assert sorted(LAYER) == MODULES, "add the module to LAYERS here and to src/gpt2lab/README.md"
    readme = (PKG / "README.md").read_text()
    for name in MODULES:
        assert f"`{name}`" in readme, f"src/gpt2lab/README.md does not place {name}"


@pytest.mark.parametrize("module", MODULES)
def test_imports_point_down_or_sideways(module: str) -> None:
    up = {d: LAYER[d] for d in _graph()[module] if LAYER[d] > LAYER[module]}
    assert not up, f"{module} (layer {LAYER[module]}) imports a higher layer: {up}"


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", TORCH_FREE)
def test_base_layer_imports_no_torch_and_no_network(module: str) -> None:
    code = f"import sys, gpt2lab.{module}; print(sorted({{'torch', 'requests', 'numpy'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_gpt2lab_is_lazy_and_the_cli_help_needs_no_torch() -> None:
    code = (
        "import sys, io, contextlib, gpt2lab\n"
        "assert 'torch' not in sys.modules\n"
        "from gpt2lab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'usage: gpt2lab' in out.getvalue(), out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'pandas', 'mlflow', 'dvc') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_lazy_names_resolve() -> None:
    import gpt2lab

    for name in gpt2lab._LAZY:
        assert getattr(gpt2lab, name).__name__ == name
    with pytest.raises(AttributeError):
        gpt2lab.no_such_name  # noqa: B018


def test_stage_scripts_never_import_the_cli() -> None:
    for script in sorted((ROOT / "stages").glob("*.py")):
        assert "gpt2lab.cli" not in imported_modules(script), script.name
        for module in imported_modules(script):
            assert module_file(module).exists(), f"{script.name} imports {module}, which does not exist"


# serving_model is MLflow's "models from code" file: importing it registers a model; tests/test_serving.py loads it.
UNTESTED_ALONE = {"serving_model"}


def test_tests_mirror_the_modules() -> None:
    tests = {p.stem.removeprefix("test_") for p in (ROOT / "tests").glob("test_*.py")}
    missing = sorted(set(MODULES) - UNTESTED_ALONE - tests)
    assert not missing, f"no tests/test_<module>.py for {missing}"
    strays = sorted(tests - set(MODULES))
    assert not strays, f"tests/test_{strays[0]}.py mirrors no module; end-to-end tests go to tests/e2e/"
