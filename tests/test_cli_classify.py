"""`gpt2lab classify`: labels and probabilities for messages given as arguments, in a file or on stdin."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2lab.classifier import Classifier
from gpt2lab.cli import main
from tests.classify_helpers import MESSAGES, make_classifier

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return make_classifier(tmp_path_factory.mktemp("clf"))


@pytest.fixture(scope="module")
def expected(saved) -> list[dict]:
    return Classifier.load(saved[0], saved[1]).classify(MESSAGES)


def assert_same(got: list[dict], want: list[dict]) -> None:
    """Same labels, same probabilities up to float rounding (another batch pads to another length)."""
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["probability"] for g in got] == pytest.approx([w["probability"] for w in want], rel=1e-5, abs=1e-7)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_messages_as_arguments_print_label_and_probability(capsys, saved, expected):
    code, out, _ = run(capsys, "classify", *MESSAGES[:2], "--model", str(saved[0]))
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2
    for line, text, want in zip(lines, MESSAGES, expected):
        label, prob, preview = line.split(maxsplit=2)
        assert label == want["label"] and label in ("spam", "ham")
        assert float(prob) == pytest.approx(want["probability"], abs=5e-5)
        assert preview == text


def test_json_output_is_a_list_of_label_and_probability(capsys, saved, expected):
    code, out, _ = run(capsys, "classify", *MESSAGES, "--model", str(saved[0]), "--json")
    assert code == 0
    assert json.loads(out) == expected  # same floats: JSON round-trips a double exactly


def test_file_one_message_per_line_after_the_arguments(capsys, saved, expected, tmp_path):
    file = tmp_path / "messages.txt"
    # CRLF line ends, blank lines (skipped) and a message holding U+2028, which is not a line end here.
    file.write_bytes(f"{MESSAGES[3]}\r\n\n   \n{MESSAGES[4]}\nline\u2028separator\n".encode())
    code, out, _ = run(capsys, "classify", MESSAGES[0], "--file", str(file), "--model", str(saved[0]), "--json")
    assert code == 0
    got = json.loads(out)
    clf = Classifier.load(saved[0], saved[1])
    assert got == clf.classify([MESSAGES[0], MESSAGES[3], MESSAGES[4], "line\u2028separator"])
    assert_same(got[:3], [expected[0], expected[3], expected[4]])


def test_file_from_standard_input(capsys, monkeypatch, saved, expected):
    stdin = io.TextIOWrapper(io.BytesIO("\n".join(MESSAGES[:2]).encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    code, out, _ = run(capsys, "classify", "--file", "-", "--model", str(saved[0]), "--json")
    assert code == 0
    assert_same(json.loads(out), expected[:2])


def test_missing_default_model_is_one_clear_line(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "classify", "hello")
    assert code == 1 and out == ""
    assert err == (
        "error: no trained classifier at models/classifier; run `make repro` or `make smoke`, or pass --model\n"
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ((), "nothing to classify"),
        (("--file", "absent.txt"), "--file absent.txt: cannot read it"),
        (("--file", "latin1.txt"), "--file latin1.txt, line 2: not UTF-8"),
    ],
)
def test_user_errors(capsys, monkeypatch, tmp_path, saved, argv, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.txt").write_bytes(b"fine\ncaf\xe9\n")
    code, out, err = run(capsys, "classify", *argv, "--model", str(saved[0]))
    assert code == 1 and out == ""
    assert err.startswith(f"error: {says}") and err.count("\n") == 1


@pytest.mark.slow
def test_command_defaults_to_the_pipeline_output_in_the_project_root(saved, expected, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(saved[0], project / "models" / "classifier")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "gpt2lab.cli", "classify", *MESSAGES[:2], "--json"]
    done = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_same(json.loads(done.stdout), expected[:2])


def test_help_names_the_base_option_as_the_errors_do(capsys):
    with pytest.raises(SystemExit) as done:
        main(["classify", "--help"])
    assert done.value.code == 0
    assert "--base DIR" in capsys.readouterr().out  # the wording of the missing-base error below


def test_missing_base_checkpoint_points_at_the_base_option(capsys, tmp_path):
    """The library's message names its Python argument (base_dir=); the command's names --base DIR."""
    clf, base = make_classifier(tmp_path)
    moved = base.rename(tmp_path / "moved-base")
    for extra in ([], ["--base", str(tmp_path / "absent")]):  # the recorded base gone; a wrong --base
        code, out, err = run(capsys, "classify", "hello", "--model", str(clf), *extra)
        assert code == 1 and out == ""
        line = err.rstrip("\n").splitlines()[-1]
        assert line.startswith("error: ") and "not found (no such folder" in line
        assert "pass --base DIR" in line and "base_dir" not in line
        assert str(base) in line  # the base it was trained on, recorded at training time
    code, out, err = run(capsys, "classify", "hello", "--model", str(clf), "--base", str(moved))
    assert code == 0 and out.split()[0] in ("spam", "ham"), err
