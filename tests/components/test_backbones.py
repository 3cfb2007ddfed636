"""Causal LM backbone: condition shape, padding invariance, parameter groups, local weights."""

from __future__ import annotations

import pytest
import torch

from unizoo.components.backbones.causal_lm import CausalLMBackbone
from unizoo.data.captions import vocabulary
from unizoo.text import word_level_tokenizer

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return CausalLMBackbone(word_level_tokenizer(vocabulary()), num_queries=5, config_overrides=SMALL).eval()


def test_condition_shape(backbone):
    cond = backbone.condition(["a red circle", "two blue squares"])
    assert cond.shape == (2, 5, 32)


def test_left_padding_does_not_change_the_condition(backbone):
    alone = backbone.condition(["a red circle"])
    padded = backbone.condition(["a red circle", "a red circle above a blue square"])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_condition_depends_on_the_caption(backbone):
    a, b = backbone.condition(["a red circle", "a blue circle"])
    assert (a - b).abs().max() > 1e-3


def test_every_caption_word_is_in_the_vocabulary():
    tokenizer = word_level_tokenizer(vocabulary())
    ids = tokenizer(["two green triangles", "a magenta square left of a cyan circle"])["input_ids"]
    assert tokenizer.unk_token_id not in sum(ids, [])


def test_parameter_groups_cover_the_trainable_parameters(backbone):
    groups = backbone.parameter_groups()
    assert set(groups) == {"backbone", "queries"}
    grouped = {id(p) for params in groups.values() for p in params}
    assert grouped == {id(p) for p in backbone.parameters()}


def test_pretrained_directory_round_trip(backbone, tmp_path):
    backbone.lm.save_pretrained(tmp_path / "lm")
    loaded = CausalLMBackbone(backbone.tokenizer, num_queries=5, pretrained=str(tmp_path / "lm")).eval()
    loaded.queries.data.copy_(backbone.queries.data)
    assert torch.allclose(loaded.condition(["a red circle"]), backbone.condition(["a red circle"]), atol=1e-6)


def test_missing_pretrained_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        CausalLMBackbone(word_level_tokenizer(vocabulary()), pretrained=str(tmp_path / "nope"))


def test_unknown_size_lists_sizes():
    with pytest.raises(ValueError, match="tiny, small, base"):
        CausalLMBackbone(word_level_tokenizer(vocabulary()), size="huge")
