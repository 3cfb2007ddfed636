"""Captions as padded ids, each caption encoded once (unizoo.text.caption_ids): the tokenizer's batch to the bit."""

from __future__ import annotations

import pytest
import torch
from tokenizers import processors

from unizoo.pretraining.clip import clip_tokenizer
from unizoo.text import word_level_tokenizer
from unizoo.text.caption_ids import CaptionIds

WORDS = "a an red green blue circle square triangle above below left of right and two three the".split()
BATCHES = [
    ["a red circle", "two green squares above a blue triangle", "a red circle"],  # a repeat, an unknown word
    ["a red circle", "the", "a blue square left of a green circle and a red triangle below three squares"],  # truncated
    ["a red circle", "", "A RED CIRCLE"],  # an empty caption; the tokenizer lower-cases
    ["the"],
]


class CountingTokenizer:
    """The tokenizer, with the captions of each call it gets recorded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, captions, **options):
        self.calls.append(list(captions))
        return self.tokenizer(captions, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def padded_by_the_tokenizer(tokenizer, captions, max_length):
    encoded = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def with_bos_and_eos(tokenizer):
    """The word-level tokenizer adding `<bos> ... <eos>` around each caption, as many real LMs' tokenizers do."""
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)])
    return tokenizer


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("special_tokens", [False, True], ids=["plain", "bos_eos"])
def test_every_batch_equals_the_tokenizers_own_to_the_bit(padding_side, special_tokens):
    tokenizer = word_level_tokenizer(WORDS)
    tokenizer.padding_side = padding_side
    if special_tokens:
        tokenizer = with_bos_and_eos(tokenizer)
    caption_ids = CaptionIds(tokenizer, max_length=8)
    for _ in range(2):  # first encoded, then read from the memo
        for captions in BATCHES:
            ids, mask = caption_ids(captions)
            want_ids, want_mask = padded_by_the_tokenizer(tokenizer, captions, 8)
            assert ids.dtype == want_ids.dtype == mask.dtype == want_mask.dtype == torch.long
            assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask), captions
    # The truncated caption is cut to 8 tokens, special ones included, exactly as in the tokenizer's batch.
    assert caption_ids(BATCHES[1])[0].shape == (3, 8)


def test_each_caption_is_encoded_once():
    tokenizer = CountingTokenizer(word_level_tokenizer(WORDS))
    caption_ids = CaptionIds(tokenizer, max_length=8)
    caption_ids(["a red circle", "the", "a red circle"])
    caption_ids(["the", "a blue square", "a red circle"])
    caption_ids(["a blue square", "the"])
    assert tokenizer.calls == [["a red circle", "the"], ["a blue square"]]
    assert len(caption_ids) == 3


def test_beyond_its_capacity_captions_are_encoded_at_every_call_and_still_exact():
    tokenizer = CountingTokenizer(word_level_tokenizer(WORDS))
    caption_ids = CaptionIds(tokenizer, max_length=8, capacity=2)
    captions = ["a red circle", "the", "a blue square left of a green circle"]
    for _ in range(2):
        ids, mask = caption_ids(captions)
        want_ids, want_mask = padded_by_the_tokenizer(tokenizer.tokenizer, captions, 8)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask)
    assert len(caption_ids) == 2
    assert tokenizer.calls == [captions, ["a blue square left of a green circle"]]


def test_a_tokenizer_without_a_padding_token_is_refused_when_the_backbone_is_built():
    tokenizer = word_level_tokenizer(WORDS)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match=r"backbone.tokenizer \(\w+\) has no padding token"):
        CaptionIds(tokenizer, max_length=8)


def test_without_special_tokens_the_rows_are_the_tokenizers_own():
    tokenizer = with_bos_and_eos(word_level_tokenizer(WORDS))
    caption_ids = CaptionIds(tokenizer, max_length=8, add_special_tokens=False)
    for captions in [*BATCHES, *BATCHES]:
        assert caption_ids.rows(captions) == tokenizer(captions, add_special_tokens=False, truncation=True, max_length=8)["input_ids"]
    assert caption_ids.rows(["a red circle"]) == [[tokenizer.convert_tokens_to_ids(word) for word in ("a", "red", "circle")]]


def test_without_a_max_length_nothing_is_cut_as_clip_pretraining_reads_its_captions():
    tokenizer = clip_tokenizer(WORDS)  # EOS appended by its post-processor, right padding
    caption_ids = CaptionIds(tokenizer, max_length=None, owner="the CLIP tokenizer")
    for captions in [*BATCHES, *BATCHES]:
        want = tokenizer(captions, padding=True, return_tensors="pt")
        ids, mask = caption_ids(captions)
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"]), captions
    assert ids.shape == (1, 2)  # "the" and EOS
    assert max(map(len, caption_ids.rows(BATCHES[1]))) == 15 + 1  # the long caption whole (15 words), with its EOS


def test_the_refusal_names_whose_tokenizer_it_is():
    tokenizer = word_level_tokenizer(WORDS)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match=r"^the CLIP tokenizer \(\w+\) has no padding token"):
        CaptionIds(tokenizer, max_length=None, owner="the CLIP tokenizer")
