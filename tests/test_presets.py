"""GPT-2's sizes and names."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.model import GPT2, GPT2Config


@pytest.mark.parametrize("name,params", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])  # fmt: skip
def test_presets_have_the_published_sizes(name, params):
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset(name))
    assert model.num_parameters() == params


def test_unknown_preset_names_the_allowed():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPT2Config.preset("gpt3")
