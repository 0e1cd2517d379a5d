"""The smoke profile as a `dvc exp run --temp` command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpt2lab import smoke as pipeline
from gpt2lab.params import ParamsError

ROOT = Path(__file__).resolve().parents[1]


def test_override_values_in_dvc_set_param_syntax() -> None:
    assert pipeline.override_value("random") == "random"
    assert pipeline.override_value(2) == "2" and pipeline.override_value(None) == "null"
    assert pipeline.override_value(True) == "true" and pipeline.override_value(1e-4) == "0.0001"
    assert pipeline.override_value("null") == "'null'"  # the string, not None
    assert pipeline.override_value("it's a=b") == "'it\\'s a=b'"
    assert pipeline.override_value(["attn.c_attn", "mlp.c_fc"]) == "[attn.c_attn,mlp.c_fc]"


def test_smoke_profile_is_valid_and_runs_in_a_temporary_copy() -> None:
    cmd = pipeline.smoke_command(ROOT, ["-n", "x"])
    assert cmd[1:6] == ["-m", "dvc", "exp", "run", "--temp"] and cmd[-2:] == ["-n", "x"]
    overrides = pipeline.load_overrides(ROOT / pipeline.SMOKE_FILE, ROOT / "params.yaml")
    assert overrides["weights.source"] == "random" and overrides["train.epochs"] == 1
    assert "-S" in cmd and "weights.source=random" in cmd
    # The data stages keep the committed params, so the smoke run shares their lock and cache.
    assert not [k for k in overrides if k.split(".")[0] in ("data", "seed")]


def test_smoke_profile_rejects_a_bad_key(tmp_path: Path) -> None:
    (tmp_path / "smoke.yaml").write_text("lora:\n  rnak: 4\n")
    with pytest.raises(ParamsError, match=r"smoke\.yaml: lora\.rnak: unknown key"):
        pipeline.load_overrides(tmp_path / "smoke.yaml", ROOT / "params.yaml")
