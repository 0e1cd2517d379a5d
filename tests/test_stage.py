"""The stage runner: a bad params.yaml stops a stage script before any work, with one line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import one_error_line

ROOT = Path(__file__).resolve().parents[1]





# --- stage scripts with a bad params.yaml ----------------------------------------------------------
COMMITTED = yaml.safe_load((ROOT / "params.yaml").read_text())


def _set(**changes):
    """A params.yaml edit: ``_set(lora__rank=0)`` sets ``lora.rank`` to 0."""

    def edit(raw: dict) -> dict:
        for dotted, value in changes.items():
            *path, key = dotted.split("__")
            node = raw
            for part in path:
                node = node[part]
            node[key] = value
        return raw

    return edit


STAGE_MISTAKES = [
    # (stage, params.yaml edit or raw text, what the error line must start with)
    ("train", _set(lora__rnak=4), "error: lora.rnak: unknown key; allowed keys: rank, alpha"),
    ("train", _set(lora__rank=0), "error: lora.rank: invalid value 0; allowed: an integer > 0"),
    ("train", _set(train__lr=float("inf")), "error: train.lr: expected a finite number"),
    ("prepare_data", _set(data__train_frac=0.8, data__validation_frac=0.3),
     "error: data.train_frac + data.validation_frac: invalid value 1.1; allowed: a sum below 1"),
    ("download_data", _set(data__train_frac=0.8, data__validation_frac=0.3),
     "error: data.train_frac + data.validation_frac"),
    ("prepare_data", _set(seed=-1), "error: seed: invalid value -1; allowed: an integer from 0 to"),
    ("fetch_weights", _set(model__name="gpt3"), "error: model.name: invalid value 'gpt3'; allowed: gpt2 | gpt2-medium"),
    ("fetch_weights", _set(weights__source="s3"), "error: weights.source: invalid value 's3'"),
    ("generate", _set(generate__top_p=2), "error: generate.top_p: invalid value 2.0; allowed: 0 < top_p <= 1"),
    ("evaluate", _set(eval__threshold=1.5), "error: eval.threshold: invalid value 1.5"),
    ("evaluate", _set(tracking__experiment=""), "error: tracking.experiment: invalid value ''"),  # read by every stage
    ("generate", "generate:\n  prompts: [unclosed\n", "error: params.yaml, line 3: not valid YAML"),
    ("train", None, "error: params.yaml: cannot read it (No such file or directory)"),
]  # fmt: skip


def make_project(root: Path, edit) -> Path:
    """A copy of the stage scripts beside a params.yaml: the committed one edited, raw text, or none."""
    shutil.copytree(ROOT / "stages", root / "stages")
    if isinstance(edit, str):
        (root / "params.yaml").write_text(edit)
    elif edit is not None:
        (root / "params.yaml").write_text(yaml.safe_dump(edit(yaml.safe_load(yaml.safe_dump(COMMITTED)))))
    return root


def assert_nothing_written(project: Path) -> None:
    left = sorted(p.name for p in project.iterdir())
    assert left in (["params.yaml", "stages"], ["stages"]), left  # no data/, models/, metrics/, mlflow.db


@pytest.mark.parametrize(
    ("stage", "edit", "says"), STAGE_MISTAKES, ids=[f"{m[0]}-{m[2][7:40]}" for m in STAGE_MISTAKES]
)
def test_stage_with_bad_params_stops_before_any_work(tmp_path, monkeypatch, capsys, stage, edit, says):
    """The stage script runs in this process (as ``python stages/<stage>.py`` would) to keep the suite fast."""
    import runpy

    project = make_project(tmp_path, edit)
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(project / "stages" / f"{stage}.py"), run_name="__main__")
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1 and out == ""
    assert one_error_line(err).startswith(says)
    assert_nothing_written(project)


@pytest.mark.parametrize("index", [0, len(STAGE_MISTAKES) - 1], ids=["unknown-key", "no-params-file"])
def test_stage_process_exits_non_zero_with_one_line(tmp_path, index):
    stage, edit, says = STAGE_MISTAKES[index]
    project = make_project(tmp_path, edit)
    done = subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=project, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert one_error_line(done.stderr).startswith(says)
    assert_nothing_written(project)
