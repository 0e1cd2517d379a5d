"""dvc.yaml and dvc.lock: thin stages whose deps are exactly what can change their outputs, and
whose small results are declared so DVC's run-cache can restore every stage."""

from __future__ import annotations

import ast
import hashlib
import runpy
from pathlib import Path

import pytest
import yaml

from gpt2lab.params import SECTIONS, neutral_keys
from tests.project.imports import ROOT, closure, module_file

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = ("validate_params", "download_data", "prepare_data", "fetch_weights", "evaluate", "generate", "train", "track")
# Modules that cannot change any output: the lazy package facade, the error base class, the runner.
RESULT_NEUTRAL = frozenset({"gpt2lab", "gpt2lab.errors", "gpt2lab.stage"})
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _out_path(entry: str | dict) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


def _code_deps(name: str) -> set[str]:
    return {d for d in DVC_YAML["stages"][name]["deps"] if d.endswith(".py")}


def params_read(script: Path) -> set[str]:
    """``section.key`` (or ``seed``) of every param the stage script reads from ``load_params()``.

    A section passed on whole (``fetch_weights(params.model, ...)``) counts as all its keys.
    """
    tree = ast.parse(script.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    roots, aliases = set(), {}  # `params = load_params()`; `data = params.data`
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "load_params":
                roots.add(node.targets[0].id)
            elif isinstance(value, ast.Attribute) and getattr(value.value, "id", None) in roots:
                aliases[node.targets[0].id] = value.attr
    keys: set[str] = set()

    def whole(section: str) -> set[str]:
        fields = SECTIONS[section].__dataclass_fields__
        return {f"{section}.{k}" for k in fields}

    for node in ast.walk(tree):
        parent = parents.get(node)
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) in roots:
            if node.attr == "seed":
                keys.add("seed")
            elif isinstance(parent, ast.Attribute):
                keys.add(f"{node.attr}.{parent.attr}")
            elif not (isinstance(parent, ast.Assign) and parent.value is node):
                keys |= whole(node.attr)
        elif isinstance(node, ast.Name) and node.id in aliases and isinstance(node.ctx, ast.Load):
            if isinstance(parent, ast.Attribute):
                keys.add(f"{aliases[node.id]}.{parent.attr}")
            else:
                keys |= whole(aliases[node.id])
    return keys


def _neutral() -> set[str]:
    return {f"{section}.{key}" for section, cls in SECTIONS.items() for key in neutral_keys(cls)}


def test_dvc_exp_show_keeps_the_test_f1_and_the_lora_rank_in_view() -> None:
    """`dvc exp show` never folds the first metric column nor the first param column into '…':
    they are the test split's F1 (the evaluation's file, declared first) and ``lora.rank``."""
    metrics = [next(iter(m)) if isinstance(m, dict) else m
               for stage in DVC_YAML["stages"].values() for m in stage.get("metrics", [])]  # fmt: skip
    assert metrics[0] == "metrics/eval.json"
    from gpt2lab.evaluate import HEADLINE_METRICS, HEADLINE_SPLIT

    assert (HEADLINE_SPLIT, HEADLINE_METRICS[0]) == ("test", "f1")
    assert list(PARAMS)[0] == "lora" and list(PARAMS["lora"])[0] == "rank"


def test_stages_are_thin_scripts() -> None:
    assert tuple(DVC_YAML["stages"]) == STAGES
    for name, stage in DVC_YAML["stages"].items():
        assert stage["cmd"] == f"python stages/{name}.py"
        assert f"stages/{name}.py" in stage["deps"]
        assert len((ROOT / f"stages/{name}.py").read_text().splitlines()) < 40


@pytest.mark.parametrize("name", STAGES)
def test_code_deps_are_exactly_the_modules_that_can_change_the_outputs(name: str) -> None:
    script = ROOT / f"stages/{name}.py"
    expected = {module_file(m).relative_to(ROOT).as_posix() for m in closure(script, RESULT_NEUTRAL)}
    assert _code_deps(name) == expected | {f"stages/{name}.py"}


def test_decoding_stages_depend_on_the_kernel_source_they_build() -> None:
    """gpt2lab.kernels builds decoding's C++ kernels from source files: a stage that decodes lists them all."""
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "src/gpt2lab/csrc").glob("*.cpp")}
    assert len(sources) == 3
    for name in STAGES:
        decodes = "src/gpt2lab/generate.py" in _code_deps(name)
        listed = sources & set(DVC_YAML["stages"][name]["deps"])
        assert listed == (sources if decodes else set()), name


def _result_shaping() -> set[str]:
    """Every key of params.yaml that can change a result: all but the neutral ones and ``tracking``."""
    keys = {"seed"} | {f"{sec}.{k}" for sec, cls in SECTIONS.items() for k in cls.__dataclass_fields__}
    return {k for k in keys if not k.startswith("tracking.")} - _neutral()


@pytest.mark.parametrize("name", [s for s in STAGES if s != "validate_params"])
def test_params_are_exactly_the_result_shaping_keys_the_stage_reads(name: str) -> None:
    declared = set(DVC_YAML["stages"][name].get("params", []))
    assert declared == params_read(ROOT / f"stages/{name}.py") - _neutral()
    assert not declared & _neutral()


def test_validation_comes_first_and_watches_every_result_shaping_key() -> None:
    """Any change to a key that re-runs a stage re-runs validate_params too, and every stage waits for it."""
    stages = DVC_YAML["stages"]
    assert set(stages["validate_params"]["params"]) == _result_shaping()
    (stamp,) = stages["validate_params"]["outs"]
    assert all(stamp in stage["deps"] for name, stage in stages.items() if name != "validate_params")


def test_the_params_reader_sees_keys_sections_and_aliases(tmp_path: Path) -> None:
    script = tmp_path / "s.py"
    script.write_text(
        "params = load_params()\nd = params.data\nf(d.sources, d.timeout_s, params.seed)\n"
        "g(params.eval)\nh(params.train.lr)\n"
    )
    assert params_read(script) == {"data.sources", "data.timeout_s", "seed", "train.lr"} | {
        f"eval.{k}" for k in SECTIONS["eval"].__dataclass_fields__
    }


def test_every_small_output_is_a_metric_or_plot_so_the_run_cache_is_kept() -> None:
    """DVC skips its run-cache for a stage with a cache: false out that is not a metric or plot."""
    for name, stage in DVC_YAML["stages"].items():
        for out in stage.get("outs", []):
            opts = out[_out_path(out)] if isinstance(out, dict) else {}
            assert opts.get("cache", True), f"{name}: {_out_path(out)} is cache: false; declare it as a metric or plot"
        for kind in ("metrics", "plots"):
            for out in stage.get(kind, []):
                assert isinstance(out, dict) and out[_out_path(out)].get("cache") is False, (name, out)


def test_track_depends_on_every_result() -> None:
    track = set(DVC_YAML["stages"]["track"]["deps"])
    for name, stage in DVC_YAML["stages"].items():
        if name == "track":
            continue
        outs = [_out_path(o) for kind in ("outs", "metrics", "plots") for o in stage.get(kind, [])]
        missing = [o for o in outs if not any(o == dep or o.startswith(dep + "/") for dep in track)]
        assert not missing, f"track does not depend on {name}'s {missing}"  # itself, or its folder
    files = runpy.run_path(str(ROOT / "stages/track.py"))["FILES"]  # what the stage reads
    read = [*files.metrics.values(), *files.curves, *files.datasets.values(),
            *(p for ps in files.artifacts.values() for p in ps), files.raw_dir, files.base_dir,
            files.classifier_dir]  # fmt: skip
    for path in read:
        assert any(path == dep or path.startswith(dep + "/") for dep in track), f"track reads {path}, not a dep"


def test_lock_records_the_committed_params_and_the_current_code() -> None:
    """dvc.lock is the record of the last run with params.yaml as committed, on the code as it is."""
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert {"download_data", "prepare_data"} <= set(lock)
    for name, entry in lock.items():
        assert entry["cmd"] == DVC_YAML["stages"][name]["cmd"]
        recorded = entry.get("params", {}).get("params.yaml", {})
        assert set(recorded) == set(DVC_YAML["stages"][name].get("params", [])), name
        for key, value in recorded.items():
            section, _, field = key.partition(".")
            want = PARAMS[section][field] if field else PARAMS[key]
            if isinstance(want, float):  # DVC writes 5e-05, which PyYAML (YAML 1.1) reads as a string
                value = float(value)
            assert value == want, f"dvc.lock's {name} ran with other {key}"
        for dep in entry["deps"]:
            path = ROOT / dep["path"]
            if path.is_file():
                md5 = hashlib.md5(path.read_bytes()).hexdigest()
                assert dep["md5"] == md5, f"dvc.lock's {name} ran on another {dep['path']}: run `dvc repro {name}`"
