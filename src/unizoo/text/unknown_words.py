"""Words a tokenizer cannot read: a prompt that uses them is warned about, never sampled in silence.

A word-level tokenizer (the embedded default's) maps every word outside its vocabulary
to its unknown token, so "a purple hexagon" reaches the model as "a <unk> <unk>" and
the image answers a different prompt from the one the user typed. Tokenizers without an
unknown token (byte-level BPE, as real LMs use) can spell any word and never warn.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Vocabularies up to this size are listed in the warning; larger ones are only pointed at.
_LISTED_WORDS = 100


def unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The pieces of `text` that `tokenizer` maps to its unknown token, in order, each once."""
    unknown = tokenizer.unk_token_id
    if unknown is None:
        return []
    if tokenizer.is_fast:  # offsets point each token back at the characters it came from
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = [text[start:end] for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]) if token == unknown]
    else:
        pieces = [word for word in text.split() if unknown in tokenizer(word, add_special_tokens=False)["input_ids"]]
    return list(dict.fromkeys(pieces))


def warn_unknown_words(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], vocabulary_at: str, what: str = "prompt"
) -> dict[str, list[str]]:
    """Log one warning per distinct text with unknown words, naming them; returns {text: words}.

    `vocabulary_at` says where the user can read the vocabulary (`unizoo.training.runs.run_vocabulary(run_dir)`).
    """
    found = {text: words for text in dict.fromkeys(texts) if (words := unknown_words(tokenizer, text))}
    if not found:
        return found
    special = set(tokenizer.all_special_tokens)
    known = sorted(word for word in tokenizer.get_vocab() if word not in special)
    listed = f" It knows {len(known)} words: {', '.join(known)}." if len(known) <= _LISTED_WORDS else ""
    for text, words in found.items():
        log.warning(
            "%s %r: %s %s not in the tokenizer's vocabulary; it reads %s as %s, so the model never sees %s.%s %s",
            what, text, ", ".join(repr(w) for w in words), "is" if len(words) == 1 else "are",
            "it" if len(words) == 1 else "each", tokenizer.unk_token, "it" if len(words) == 1 else "them",
            listed, vocabulary_at,
        )
    return found
