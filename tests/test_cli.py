"""The gpt2lab command: classify, generate, convert; every mistake is one line and exit 1."""

from __future__ import annotations

import io
import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2lab.checkpoint import random_checkpoint
from gpt2lab.cli import main
from gpt2lab.inference import Classifier
from tests.helpers import MESSAGES, make_classifier, one_error_line

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
    assert [g["spam_probability"] for g in got] == pytest.approx([w["spam_probability"] for w in want], rel=1e-5, abs=1e-7)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_messages_as_arguments_print_label_and_probability(capsys, saved, expected):
    code, out, err = run(capsys, "classify", *MESSAGES[:2], "--model", str(saved[0]))
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["label", "P(spam)", "message"]  # the number is the spam probability, whatever the label
    assert len(lines) == 2
    assert "random base weights" in err  # the test classifier is a smoke-run one, and says so once
    for line, text, want in zip(lines, MESSAGES, expected):
        label, prob, preview = line.split(maxsplit=2)
        assert label == want["label"] and label in ("spam", "ham")
        assert float(prob) == pytest.approx(want["spam_probability"], abs=5e-5)
        assert preview == text


def test_json_output_is_a_list_of_label_and_probability(capsys, saved, expected):
    code, out, _ = run(capsys, "classify", *MESSAGES, "--model", str(saved[0]), "--json")
    assert code == 0
    assert json.loads(out) == expected  # same floats: JSON round-trips a double exactly
    assert set(json.loads(out)[0]) == {"label", "spam_probability"}


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
        "error: no trained classifier at models/classifier; run `make repro` (or `make smoke`, then use the "
        "--model runs:/... it prints), or pass --model\n"
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
    assert code == 0 and out.splitlines()[1].split()[0] in ("spam", "ham"), err


ROOT = Path(__file__).resolve().parents[1]





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
    (["classify", "hi", "--model", "{corrupt_clf}"], "adapter.safetensors: corrupted or replaced: expected sha256"),
    (["classify", "hi", "--model", "{clf}", "--base", "{corrupt_base}"], "model.safetensors: corrupted or replaced: expected sha256"),
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
    (["generate", "hi", "--model", "{corrupt_base}"], "model.safetensors: corrupted or replaced: expected sha256"),
    (["classify", "hi", "--model", "{clf}", "--device", "gpu"], "--device: invalid value 'gpu'; allowed: auto | cpu"),
    (["classify", "hi", "--model", "{clf}", "--device", "cpu", "--precision", "fp16"], "--precision: fp16 runs only on CUDA"),
    (["generate", "hi", "--model", "{base}", "--device", "cpu", "--precision", "fp16"], "--precision: fp16 runs only on CUDA"),
    *([] if torch.cuda.is_available() else [
        (["classify", "hi", "--model", "{clf}", "--device", "cuda"], "--device: cuda asked for, but this PyTorch is a CPU-only"),
        (["generate", "hi", "--model", "{base}", "--device", "cuda:1"], "--device: cuda:1 asked for, but "),
    ]),  # fmt: skip
    (["serve", "runs:/x/model", "--device", "gpu"], "--device: invalid value 'gpu'; allowed: auto | cpu"),
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


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_cfg) -> Path:
    return random_checkpoint(tiny_cfg, seed=0, out_dir=tmp_path / "models" / "base")


def test_cli_streams_the_prompt_and_continuation(tiny_checkpoint, capsys):
    code = main(["generate", "Every effort moves you", "--model", str(tiny_checkpoint),
                     "--max-new-tokens", "6", "--temperature", "0"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("Every effort moves you") and len(out) > len("Every effort moves you")
    # stdout is the text alone; stderr ends with the summary (and warned once of the random weights).
    assert re.fullmatch(r"6 tokens in \d+\.\d\d s \(\d+\.\d tokens/s\)", err.splitlines()[-1])
    assert err.count("random weights") == 1


def test_cli_device_and_precision_flags(tiny_checkpoint, capsys, saved, expected):
    argv = ["generate", "Every effort moves you", "--model", str(tiny_checkpoint), "--max-new-tokens", "6",
            "--temperature", "1.0", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    sampled = capsys.readouterr().out
    assert main([*argv, "--device", "auto"]) == 0 and capsys.readouterr().out == sampled  # draws on the CPU
    assert main([*argv, "--device", "cpu", "--precision", "auto"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "classify", *MESSAGES, "--model", str(saved[0]), "--json", "--device", "cpu")
    assert code == 0
    assert_same(json.loads(out), expected)


def test_cli_serve_overrides_only_the_config_keys_given(monkeypatch):
    import gpt2lab.server

    calls = []
    monkeypatch.setattr(gpt2lab.server, "serve", lambda *a, **kw: calls.append(kw["model_config"]))
    assert main(["serve", "runs:/x/model"]) == 0  # the model's own config: a GPU when there is one
    assert main(["serve", "runs:/x/model", "--device", "cpu"]) == 0
    assert main(["serve", "runs:/x/model", "--precision", "int8", "--device", "cpu"]) == 0
    assert calls == [None, {"device": "cpu"}, {"precision": "int8", "device": "cpu"}]


def test_cli_prompt_lookup_prints_the_same_text(tiny_checkpoint, capsys):
    argv = ["generate", "Every effort moves you", "--model", str(tiny_checkpoint), "--max-new-tokens", "12",
            "--temperature", "0"]  # fmt: skip
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--prompt-lookup", "5"]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("flag,value,name", [("--top-p", "2", "top_p"), ("--prompt-lookup", "-1", "--prompt-lookup")])
def test_cli_reports_a_bad_argument_in_one_line(tiny_checkpoint, capsys, flag, value, name):
    code = main(["generate", "hi", "--model", str(tiny_checkpoint), flag, value])
    err = capsys.readouterr().err
    assert code == 1 and name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_int8_generates_and_classifies_close_to_fp32(tiny_checkpoint, saved, expected, capsys):
    code = main(["generate", "Every effort moves you", "--model", str(tiny_checkpoint), "--max-new-tokens", "6",
                 "--temperature", "0", "--precision", "int8"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("Every effort moves you") and len(out) > len("Every effort moves you")
    code, out, _ = run(capsys, "classify", *MESSAGES, "--model", str(saved[0]), "--json", "--precision", "int8")
    assert code == 0
    got = json.loads(out)
    assert [g["spam_probability"] for g in got] == pytest.approx([w["spam_probability"] for w in expected], abs=0.05)


def test_cli_compiled_generation_prints_the_uncompiled_text(tiny_checkpoint, capsys, cpp_compiler):
    args = ["generate", "Every effort moves you", "--model", str(tiny_checkpoint), "--max-new-tokens", "12",
            "--temperature", "0"]  # fmt: skip
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--compile"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*args, "--compile", "--precision", "int8"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: torch.compile runs float weights") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["generate", "classify"])
def test_int8_on_a_cpu_without_the_kernels_is_one_error_line(files, command):
    """ATEN_CPU_CAPABILITY=default makes torch run as on a CPU without AVX2: int8 is refused, not slow or wrong."""
    model = files["base"] if command == "generate" else files["clf"]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    done = subprocess.run([sys.executable, "-m", "gpt2lab.cli", command, "hi", "--model", str(model), "--precision",
                           "int8"], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    line = one_error_line(done.stderr)
    assert "precision int8 is not available" in line and "AVX2" in line and "bf16 or fp32" in line


def test_cli_convert_and_one_line_errors(hf_tiny, tmp_path):
    _, folder = hf_tiny
    ok = subprocess.run([sys.executable, "-m", "gpt2lab.cli", "convert", str(folder), str(tmp_path / "out")],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = subprocess.run([sys.executable, "-m", "gpt2lab.cli", "convert", str(tmp_path / "nope"), str(tmp_path / "o2")],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_bare_command_prints_help_and_version_answers(capsys):
    import gpt2lab

    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gpt2lab") and "classify" in out and "``" not in out  # no docstring markup
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"gpt2lab {gpt2lab.__version__}\n"


def test_a_reader_that_leaves_early_ends_the_output_quietly(saved, tmp_path):
    """`gpt2lab classify --file many | head -1`: no traceback, the shell's status for SIGPIPE (141)."""
    clf, base = saved
    (tmp_path / "many.txt").write_text("see you at lunch, and bring the thing you promised last week\n" * 3000)
    script = (f"{sys.executable} -m gpt2lab.cli classify --file {tmp_path / 'many.txt'} --model {clf} --base {base}"
              " 2>err.txt | head -2; echo ${PIPESTATUS[0]} > status.txt")  # fmt: skip
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.stdout.count("\n") == 2 and done.stdout.split()[3] in ("ham", "spam"), done.stdout  # header, one row
    err = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in err and "Error" not in err, err  # (the random-weights warning may be there)
    assert (tmp_path / "status.txt").read_text().strip() == "141"

# --- export / import ------------------------------------------------------------------------------
def test_export_and_import_round_trip_on_the_command_line(capsys, saved, expected, tmp_path):
    clf, base = saved
    code, out, _ = run(capsys, "export", "peft", str(clf), str(tmp_path / "peft"))
    assert code == 0 and "adapter_config.json" in out
    code, out, _ = run(capsys, "import", "peft", str(tmp_path / "peft"), "--base", str(base), str(tmp_path / "back"))
    assert code == 0 and f"gpt2lab classify --model {tmp_path / 'back'}" in out
    assert_same(Classifier.load(tmp_path / "back").classify(MESSAGES), expected)
    code, out, _ = run(capsys, "export", "hf", str(base), str(tmp_path / "hf-base"))
    assert code == 0 and (tmp_path / "hf-base" / "merges.txt").is_file()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("export", "peft", "{last_block}", "{out}"), "without LoRA adapters; a PEFT LoRA adapter needs LoRA layers"),
        (("export", "hf", "{tmp}", "{out}"), "neither a classifier folder"),
        (("import", "peft", "{tmp}", "--base", "{base}", "{out}"), "no adapter_config.json; not a PEFT adapter"),
        (("export", "peft", "{tmp}/absent", "{out}"), "no classifier.json"),
    ],
)
def test_export_mistakes_are_one_error_line(capsys, saved, tmp_path, argv, says):
    from gpt2lab.classifier import build_classifier
    from gpt2lab.classifier_io import save_classifier

    base = saved[1]
    last_block = save_classifier(build_classifier(base, "last_block"), tmp_path / "lb", mode="last_block", base_dir=base)
    names = {"last_block": last_block, "out": tmp_path / "out", "tmp": tmp_path, "base": base}
    code, out, err = run(capsys, *(a.format(**names) for a in argv))
    assert code == 1 and out == ""
    assert says in one_error_line(err)


@pytest.mark.slow
def test_an_exported_classifier_runs_in_a_fresh_transformers_process_offline(saved, expected, tmp_path):
    clf, _ = saved
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "gpt2lab.cli", "export", "hf", str(clf), str(tmp_path / "hf")],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    code = (
        "import json, sys; from transformers import pipeline\n"
        "clf = pipeline('text-classification', model=sys.argv[1], top_k=None)\n"
        "print(json.dumps([{r['label']: r['score'] for r in rows} for rows in clf(json.loads(sys.argv[2]), truncation=True)]))\n"
    )
    texts = [m for m in MESSAGES if m]  # transformers has no token to read in an empty message
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf"), json.dumps(texts)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    got = [{"label": max(s, key=s.get), "spam_probability": s["spam"]} for s in json.loads(done.stdout)]
    assert_same(got, [e for m, e in zip(MESSAGES, expected) if m])


def test_a_missing_classifier_points_at_the_latest_logged_model(tmp_path, monkeypatch, capsys):
    """After `make smoke` the workspace has no models/classifier: the hint names the model to use."""
    import mlflow

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run(capsys, "classify", "hello")
    assert code == 1 and "run `make repro` (or `make smoke`" in err  # no store yet
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("gpt2lab")).info.run_id
    client.set_terminated(run_id)
    code, _, err = run(capsys, "classify", "hello")
    assert code == 1 and f"gpt2lab classify --model runs:/{run_id}/model" in err, err
