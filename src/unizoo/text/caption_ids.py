"""A batch of captions as a tokenizer pads it, from each caption's ids kept after its first encoding."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase

# Captions whose ids are kept. The shapes data has 1,584 distinct training captions; a real
# caption set is mostly unique captions, whose ids would be read once an epoch and cost memory
# (about 1 KB each at 32 tokens), so the memo stops growing here and later captions are encoded
# at every call, as without it.
CAPACITY = 16_384


class CaptionIds:
    """`tokenizer(captions, padding=True, truncation=True, max_length=max_length,
    add_special_tokens=add_special_tokens)`'s ids and attention mask `(B, L)`, equal to them,
    with each caption encoded once (`max_length=None`: no truncation, as the tokenizer without it).

    The backbone reads its captions at every training step on the main thread. A fast
    tokenizer's batch call costs 0.85 ms for 64 short captions on a 2-core Xeon, Python
    bookkeeping mostly; padding ids kept from earlier steps costs 0.16 ms. On a GPU that is
    host time inside a step of a few milliseconds. A caption's ids do not depend on the rest of
    its batch (truncation cuts each caption alone; padding only fills to the longest), so ids
    kept per caption give the tokenizer's batch exactly.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None, add_special_tokens: bool = True,
                 capacity: int = CAPACITY, owner: str = "backbone.tokenizer") -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{owner} ({type(tokenizer).__name__}) has no padding token, and each batch of captions is "
                             "padded to its longest: give it one (pad_token in its tokenizer_config.json)")
        self.tokenizer, self.max_length, self.capacity = tokenizer, max_length, capacity
        self.add_special_tokens = add_special_tokens
        self._ids: dict[str, list[int]] = {}

    def rows(self, captions: Iterable[str]) -> list[list[int]]:
        """Each caption's ids, unpadded: the tokenizer's `input_ids` for `captions`, cut to `max_length` where it is given.

        The lists are the kept ones: read them, do not change them.
        """
        captions = list(captions)
        kept = self._ids
        new = [caption for caption in dict.fromkeys(captions) if caption not in kept]
        encoded = {}
        if new:
            encoded = dict(zip(new, self.tokenizer(new, add_special_tokens=self.add_special_tokens,
                                                   truncation=self.max_length is not None, max_length=self.max_length)["input_ids"]))
        for caption, ids in encoded.items():
            if len(kept) >= self.capacity:
                break
            kept[caption] = ids
        return [kept[caption] if caption in kept else encoded[caption] for caption in captions]

    def __call__(self, captions: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(captions)
        length = max(map(len, rows), default=0)
        pad, left = self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        ids = [[pad] * (length - len(row)) + row if left else row + [pad] * (length - len(row)) for row in rows]
        mask = [[0] * (length - len(row)) + [1] * len(row) if left else [1] * len(row) + [0] * (length - len(row)) for row in rows]
        return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def __len__(self) -> int:
        """Captions whose ids are kept."""
        return len(self._ids)
