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


class PixelPatches(torch.nn.Module):
    """A stand-in vision encoder: 4x4 patches of the image as 16 tokens of 192 values."""

    token_shape = (16, 192)

    def encode(self, images):
        patches = images.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, 3, 4, 4, 8, 8)
        return patches.permute(0, 2, 3, 1, 4, 5).reshape(images.shape[0], 16, 192)

    def prepare(self, datamodule):
        self.prepared = True


@pytest.fixture
def reader():
    torch.manual_seed(0)
    return CausalLMBackbone(word_level_tokenizer(vocabulary()), num_queries=2, config_overrides=SMALL, vision_encoder=PixelPatches())


def test_vision_encoder_adds_a_projector_group(reader, backbone):
    assert reader.understands_images and not backbone.understands_images
    assert set(reader.parameter_groups()) == {"backbone", "queries", "projector"}
    reader.prepare(None)
    assert reader.vision_encoder.prepared


def test_understanding_loss_learns_to_caption():
    from unizoo.data.datamodule import ShapesDataset

    torch.manual_seed(0)
    reader = CausalLMBackbone(word_level_tokenizer(vocabulary()), num_queries=2, config_overrides=SMALL, vision_encoder=PixelPatches())
    data = ShapesDataset("train", 8)
    images = torch.stack([data[i]["image"] for i in range(8)])
    captions = [data[i]["caption"] for i in range(8)]
    optimizer = torch.optim.AdamW(reader.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = reader.understanding_loss(images, captions)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first / 10
    # Memorised: greedy decoding reproduces the training captions.
    assert reader.eval().caption(images) == captions


def understanding_targets_row_by_row(tokenizer, captions, num_prefix, max_length):
    """The understanding loss's ids, labels and mask as it built them up to f9161e4: a tensor write per row."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = tokenizer(list(captions), add_special_tokens=False, truncation=True, max_length=max_length)
    sequences = [bos + ids + [tokenizer.eos_token_id] for ids in body["input_ids"]]
    batch, length = len(sequences), max(map(len, sequences))
    ids = torch.full((batch, length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((batch, num_prefix + length), -100, dtype=torch.long)
    mask = torch.zeros(batch, num_prefix + length, dtype=torch.long)
    skip = int(tokenizer.bos_token_id is not None)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, num_prefix + skip : num_prefix + len(sequence)] = torch.tensor(sequence[skip:])
        mask[row, : num_prefix + len(sequence)] = 1
    return ids, labels, mask


@pytest.mark.parametrize("with_bos", [True, False])
def test_understanding_targets_are_the_row_by_row_ones_to_the_bit(with_bos):
    tokenizer = word_level_tokenizer(vocabulary())
    if not with_bos:
        tokenizer.bos_token = None
    backbone = CausalLMBackbone(tokenizer, num_queries=2, config_overrides=SMALL, max_caption_tokens=6)
    batches = [["a red circle", "two green triangles above a blue square", "a red circle"],  # a repeat
               ["a magenta square left of a cyan circle and two red triangles", "a red circle"]]  # cut to 6 tokens
    for captions in [*batches, *batches]:  # encoded, then read from the kept ids
        got = backbone.understanding_targets(captions, num_prefix=4)
        want = understanding_targets_row_by_row(tokenizer, captions, 4, max_length=6)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want, strict=True)), captions
    assert got[0].shape == (2, 6 + 1 + with_bos)  # the cut caption, EOS, BOS where there is one


def test_understanding_without_a_vision_encoder_is_a_clear_error(backbone):
    with pytest.raises(RuntimeError, match="vision_encoder"):
        backbone.understanding_loss(torch.zeros(1, 3, 32, 32), ["a red circle"])


def test_hidden_states_hold_every_layer_and_the_padding(backbone):
    captions = ["a red circle", "a red circle above a blue square"]
    states, mask = backbone.hidden_states(captions)
    short, long = (len(backbone.tokenizer(c)["input_ids"]) for c in captions)
    assert states.shape == (2, SMALL["num_hidden_layers"], long + 5, 32) and mask.dtype == torch.bool
    # Left padding: the short caption's first positions are padding, the queries never are.
    assert mask[0].tolist() == [False] * (long - short) + [True] * (short + 5) and mask[1].all()
    # The last layer at the query positions is the shallow condition, exactly.
    assert torch.equal(states[:, -1, -5:], backbone.condition(captions))
    # Earlier layers differ from the last: there is something deeper to read.
    assert (states[:, 0, -5:] - states[:, -1, -5:]).abs().max() > 1e-2
    # They are what transformers reports as each layer's output (its first entry is the embeddings).
    inputs, attention, positions = backbone._generation_inputs(captions)
    reported = backbone.lm.base_model(inputs_embeds=inputs, attention_mask=attention, position_ids=positions, output_hidden_states=True)
    assert all(torch.equal(states[:, i], reported.hidden_states[i + 1]) for i in range(SMALL["num_hidden_layers"]))


def test_reading_hidden_states_leaves_the_backbone_picklable(backbone):
    # Data-parallel training spawns the model pickled; transformers' output_hidden_states would leave
    # unpicklable hooks behind.
    import pickle

    backbone.hidden_states(["a red circle"])
    assert pickle.loads(pickle.dumps(backbone)).hidden_states(["a red circle"])[0].shape == (1, SMALL["num_hidden_layers"], 3 + 5, 32)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_mask_built_on_the_device_gives_transformers_numbers(implementation, monkeypatch):
    """sdpa is handed its 4D causal mask (transformers would read the 2D one on the host to decide
    whether to drop it); the condition, every layer's states and the understanding loss are the
    ones transformers' own mask gives, to the bit. Eager keeps the 2D mask."""
    import unizoo.components.backbones.causal_lm as causal_lm

    torch.manual_seed(0)
    reader = CausalLMBackbone(word_level_tokenizer(vocabulary()), num_queries=3, config_overrides=SMALL,
                              vision_encoder=PixelPatches(), attn_implementation=implementation).eval()
    assert reader.lm.config._attn_implementation == implementation
    captions = ["a red circle", "two blue squares above a green triangle", "a circle"]
    images = torch.randn(3, 3, 32, 32)

    def outputs():
        with torch.no_grad():
            return reader.condition(captions), reader.hidden_states(captions)[0], reader.understanding_loss(images, captions)

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    built = causal_lm.lm_attention_mask(reader.lm, mask)
    if implementation == "sdpa":
        assert built.shape == (2, 1, 3, 3) and built.dtype == torch.bool
        # Causal, and no real token reads the left padding.
        assert built[0, 0].tolist() == [[False, False, False], [False, True, False], [False, True, True]]
        assert built[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    else:
        assert built is mask
    ours = outputs()
    monkeypatch.setattr(causal_lm, "lm_attention_mask", lambda lm, mask: mask)  # transformers builds it
    theirs = outputs()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
