"""Text: the tokenizers unizoo builds itself, captions as padded ids, and the words a tokenizer cannot read.

    tokenizer.py      word-level tokenizers over a vocabulary (the embedded default's backbone and CLIP)
    caption_ids.py    a batch of captions as its tokenizer pads it, each caption encoded once (the backbone's step, CLIP pretraining)
    unknown_words.py  prompts with words a tokenizer maps to its unknown token are warned about

A recipe names `unizoo.text.word_level_tokenizer` and `unizoo.text.data_vocabulary`
(recipes/backbone/qwen2.yaml): they are handed on here, so that path stays the public one.
"""

from unizoo.text.tokenizer import caption_words, data_vocabulary, word_level_tokenizer

__all__ = ["caption_words", "data_vocabulary", "word_level_tokenizer"]
