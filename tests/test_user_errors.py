"""User mistakes at the command line and in params.yaml: one ``error: ...`` line, a non-zero exit,
no traceback, and nothing written.

Mistakes already covered elsewhere are not repeated here: ``classify`` with no messages, a missing
or non-UTF-8 ``--file`` and the default model folder missing (tests/test_cli_classify.py);
``generate --top-p 2`` (tests/test_generate.py); ``convert`` of a missing path (tests/test_weights.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpt2lab.cli import main
from tests.classify_helpers import make_classifier

ROOT = Path(__file__).resolve().parents[1]


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line of ``err`` (log lines such as warnings may come before it)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0], err  # nothing after it
    return errors[0]


# --- the gpt2lab command ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A working classifier and base, and broken copies of each."""
    root = tmp_path_factory.mktemp("cli")
    clf, base = make_classifier(root)
    corrupt_clf = shutil.copytree(clf, root / "corrupt_clf")
    (corrupt_clf / "adapter.safetensors").write_bytes((clf / "adapter.safetensors").read_bytes()[:100])
    corrupt_base = shutil.copytree(base, root / "corrupt_base")
    (corrupt_base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:1000])
    notes = root / "notes.txt"
    notes.write_text("hello\n")
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file\n")
    openai = root / "openai"
    openai.mkdir()
    (openai / "hparams.json").write_text('{"n_vocab": 50257}')  # the other sizes are missing
    (openai / "model.ckpt.index").write_bytes(b"x")
    return {"clf": clf, "base": base, "corrupt_clf": corrupt_clf, "corrupt_base": corrupt_base, "notes": notes,
            "garbage": garbage, "openai": openai, "missing": root / "absent", "out": root / "out"}  # fmt: skip


CLI_MISTAKES = [
    # (argv with {placeholders}, what the error line must say)
    (["classify", "hi", "--model", "{missing}"], "no trained classifier at {missing}"),
    (["classify", "hi", "--model", "{base}"], "no trained classifier at {base}"),  # a GPT-2, not a classifier
    (["classify", "hi", "--model", "{corrupt_clf}"], "adapter.safetensors: unreadable"),
    (["classify", "hi", "--model", "{clf}", "--base", "{corrupt_base}"], "model.safetensors: unreadable"),
    (["classify", "hi", "--model", "{clf}", "--base", "{missing}"], "base checkpoint {missing} not found"),
    (["classify", "hi", "--model", "{clf}", "--threshold", "2"], "threshold: 2.0 is not between 0 and 1"),
    (["classify", "hi", "--model", "{clf}", "--batch-size", "0"], "batch_size: 0 is not a positive integer"),
    (["generate", "hi", "--model", "{base}", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "hi", "--model", "{base}", "--temperature", "nan"], "temperature must be >= 0"),
    (["generate", "hi", "--model", "{base}", "--top-k", "-1"], "top_k must be an integer >= 1"),
    (["generate", "hi", "--model", "{base}", "--max-new-tokens", "-1"], "--max-new-tokens -1: expected"),
    (["generate", "hi", "--model", "{base}", "--threads", "-1"], "--threads -1: expected a positive number"),
    (["generate", "hi", "--model", "{base}", "--seed", str(2**70)], f"--seed {2**70}: expected an integer from 0"),
    (["generate", "hi", "--model", "{missing}"], "{missing}: no config.json"),
    (["generate", "hi", "--model", "{clf}"], "{clf}: no config.json"),  # a classifier, not a GPT-2
    (["generate", "hi", "--model", "{corrupt_base}"], "model.safetensors: unreadable"),
    (["convert", "{notes}", "{out}"], "not a GPT-2 checkpoint"),
    (["convert", "{garbage}", "{out}"], "not a readable safetensors file"),
    (["convert", "{clf}/adapter.safetensors", "{out}"], "missing tensor 'wte.weight'"),
    (["convert", "{openai}", "{out}"], "hparams.json: unusable"),
]


@pytest.mark.parametrize(("argv", "says"), CLI_MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_cli_mistake_is_one_error_line(capsys, files, argv, says):
    fill = {k: str(v) for k, v in files.items()}
    code = main([a.format(**fill) for a in argv])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert says.format(**fill) in one_error_line(err)
    assert not files["out"].exists()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["generate", "hi", "--model", "{base}", "--threads", "0"], "--threads 0: expected a positive number"),
        (["classify", "hi", "--model", "{missing}"], "no trained classifier at {missing}"),
    ],
)
def test_cli_process_exits_non_zero_with_one_line(files, argv, says):
    fill = {k: str(v) for k, v in files.items()}
    done = subprocess.run([sys.executable, "-m", "gpt2lab.cli", *(a.format(**fill) for a in argv)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert says.format(**fill) in one_error_line(done.stderr)


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
