"""Tokenizers that unizoo builds itself (a real LM brings its own through `from_pretrained`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def word_level_tokenizer(vocabulary: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace-splitting word-level tokenizer over `vocabulary`.

    Wrapped as a `PreTrainedTokenizerFast` so it behaves (padding, `save_pretrained`,
    `AutoTokenizer.from_pretrained(run_dir / "tokenizer")`) exactly like a real LM's
    tokenizer. Padding is on the left: the backbone appends query tokens after the
    caption, and left padding keeps the queries' positions contiguous with the text.
    """
    words = sorted({w.lower() for w in vocabulary} - set(SPECIAL_TOKENS.values()))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **SPECIAL_TOKENS)


def caption_words(captions: Iterable[str], limit: int | None = None) -> list[str]:
    """The words of `captions` as `word_level_tokenizer` splits them (lower case, words and punctuation runs).

    With `limit`, only the `limit` most frequent (ties in first-seen order): real caption
    sets hold long tails of rare words whose embeddings would never train; those read as
    the unknown token instead.
    """
    split = pre_tokenizers.Whitespace()
    counts = Counter(word for caption in captions for word, _ in split.pre_tokenize_str(caption.lower()))
    ranked = [word for word, _ in counts.most_common(limit)]
    return sorted(ranked)


def data_vocabulary(data) -> list[str]:
    """The caption vocabulary a data module declares (`data.vocabulary()`), for the tokenizer built from it.

    A recipe points the backbone's tokenizer here with `data: ${data}`, so the data module
    decides the words: the shapes grammar's, or the captions of a user's folder or shards.
    """
    return list(data.vocabulary())
