"""The stage runner: a bad params.yaml stops a stage script before any work, with one line."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gpt2lab.stage import run
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
    *([] if torch.cuda.is_available() else [  # a device this machine lacks: one line, before any work
        ("train", _set(train__device="cuda"), "error: train.device: cuda asked for, but "),
        ("train", _set(train__device="cuda", train__nproc_per_node=2), "error: train.device: cuda asked for, but "),
        ("evaluate", _set(eval__device="cuda:1"), "error: eval.device: cuda:1 asked for, but "),
        ("generate", _set(generate__device="cuda"), "error: generate.device: cuda asked for, but "),
    ]),
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


# --- machine failures: one line, wherever they happen ------------------------------------------------
@pytest.mark.parametrize("error, says", [
    (OSError(errno.ENOSPC, "No space left on device", "models/x"), "No space left on device (models/x): free some"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"), "read-only; write elsewhere"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 8 vs 4"), "the disk is full or a write"),
    (Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'),
     "the disk is full"),
])  # fmt: skip
def test_machine_failures_are_one_line(capsys, error, says):
    def fail() -> None:
        raise error

    assert run(fail) == 1
    line = one_error_line(capsys.readouterr().err)
    assert says in line


def test_a_bug_keeps_its_traceback():
    def bug() -> None:
        raise ZeroDivisionError("a bug, not the machine")

    with pytest.raises(ZeroDivisionError):
        run(bug)


def test_a_full_disk_while_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """torch reports a full disk as a RuntimeError of its zip writer; the train stage says so in one line,
    leaves no half-written checkpoint and keeps the previous one to resume from."""
    import runpy

    import torch

    from gpt2lab import resume
    from gpt2lab.checkpoint import random_checkpoint
    from gpt2lab.dataset import parse_collection, split, write_split
    from tests.conftest import TINY

    root = tmp_path / "repo"
    (root / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "train.py", root / "stages" / "train.py")
    (root / "params.yaml").write_text(yaml.safe_dump(
        {"seed": 1, "lora": {"rank": 2}, "train": {"epochs": 2, "batch_size": 8, "max_length": 16, "precision": "fp32",
                                                   "eval_freq": 50, "num_threads": 1}}))  # fmt: skip
    random_checkpoint(TINY, 0, root / "models" / "base")
    df = parse_collection(ROOT / "tests" / "fixtures" / "sms_small.tsv")
    for name, part in split(df, 1, 0.7, 0.1).items():
        write_split(part, root / "data" / "prepared" / f"{name}.csv")
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    real_save, saves = torch.save, []

    def disk_full_on_the_second(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a zip")  # torch had begun writing
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4096")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(resume.torch, "save", disk_full_on_the_second)
    stage = runpy.run_path(str(root / "stages" / "train.py"))
    assert run(stage["main"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "could not write the training checkpoint" in line and "MiB free on that disk" in line
    (kept,) = (root / resume.CHECKPOINTS_DIR).glob(f"*/{resume.CHECKPOINT_FILE}")
    assert torch.load(kept, weights_only=True)["epoch"] == 1  # the first epoch's, intact
    assert not list(root.rglob(".*.tmp")) and not (root / "models" / "classifier").exists()
