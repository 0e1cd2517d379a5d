"""The smoke profile as a `dvc exp run --temp` command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpt2lab import smoke
from gpt2lab.params import ParamsError

ROOT = Path(__file__).resolve().parents[1]


def test_override_values_in_dvc_set_param_syntax() -> None:
    assert smoke.override_value("random") == "random"
    assert smoke.override_value(2) == "2" and smoke.override_value(None) == "null"
    assert smoke.override_value(True) == "true" and smoke.override_value(1e-4) == "0.0001"
    assert smoke.override_value("null") == "'null'"  # the string, not None
    assert smoke.override_value("it's a=b") == "'it\\'s a=b'"
    assert smoke.override_value(["attn.c_attn", "mlp.c_fc"]) == "[attn.c_attn,mlp.c_fc]"


def test_smoke_profile_is_valid_and_runs_in_a_temporary_copy() -> None:
    cmd = smoke.smoke_command(ROOT, ["-n", "x"])
    assert cmd[1:6] == ["-m", "gpt2lab.smoke", "exp", "run", "--temp"] and cmd[-2:] == ["-n", "x"]
    overrides = smoke.load_overrides(ROOT / smoke.SMOKE_FILE, ROOT / "params.yaml")
    assert overrides["weights.source"] == "random" and overrides["train.epochs"] == 1
    assert "-S" in cmd and "weights.source=random" in cmd
    # The data stages keep the committed params, so the smoke run shares their lock and cache.
    assert not [k for k in overrides if k.split(".")[0] in ("data", "seed")]


def test_smoke_profile_rejects_a_bad_key(tmp_path: Path) -> None:
    (tmp_path / "smoke.yaml").write_text("lora:\n  rnak: 4\n")
    with pytest.raises(ParamsError, match=r"smoke\.yaml: lora\.rnak: unknown key"):
        smoke.load_overrides(tmp_path / "smoke.yaml", ROOT / "params.yaml")


def test_a_bad_set_param_is_refused_before_dvc_runs(tmp_path):
    with pytest.raises(ParamsError, match=r"^-S: lora\.rank: invalid value 0; allowed: an integer > 0$"):
        smoke.smoke_command(ROOT, set_params=["lora.rank=0"])
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        smoke.smoke_command(ROOT, set_params=["lora.rank"])
    with pytest.raises(ParamsError, match=r"train\.batch_size: expected an integer, got 2\.5"):
        smoke.smoke_command(ROOT, set_params=["train.batch_size=2.5"])
    cmd = smoke.smoke_command(ROOT, set_params=["train.epochs=2", "lora.targets=[attn.c_attn]"])
    assert cmd.count("train.epochs=2") == 1 and "train.epochs=1" not in cmd  # the user's value replaces the profile's


@pytest.mark.parametrize("content, says", [
    (None, "params-smoke.yaml: cannot read it (No such file or directory)"),
    ("train: [1, 2", "params-smoke.yaml, line 1: not valid YAML"),
    ("- a list\n", "params-smoke.yaml: expected a mapping"),
    ("train:\n  batch_size: 2.5\n", "params-smoke.yaml: train.batch_size: expected an integer, got 2.5"),
])
def test_a_bad_or_missing_profile_is_one_line(tmp_path, content, says):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    if content is not None:
        (tmp_path / "params-smoke.yaml").write_text(content)
    with pytest.raises(ParamsError) as err:
        smoke.smoke_command(tmp_path)
    assert says in str(err.value) and "\n" not in str(err.value)
