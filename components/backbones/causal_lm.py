"""A causal LM backbone with learnable query tokens (MetaQuery / BLIP3-o).

The caption is embedded by the LM's own embedding table, `Q` learnable query
embeddings are appended after it, and the LM's last hidden states at the query
positions become the generation condition `(B, Q, D)`. Any
`AutoModelForCausalLM` works: built from a config (`tiny` preset, for tests and
the embedded default) or loaded from a local directory with `from_pretrained`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Named LM sizes for building from scratch (Qwen2 family). A real run points
# `pretrained` at a local directory instead.
LM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}


def load_causal_lm(pretrained: str | os.PathLike, attn_implementation: str = "sdpa") -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` on a local directory, with a useful error when it is missing."""
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"backbone.pretrained={str(pretrained)!r} is not a directory. Point it at a local directory holding a "
            "transformers causal LM (config.json + weights), e.g. one written by `model.save_pretrained(DIR)` or "
            "`huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir DIR` on a machine with network access; "
            "or set backbone.pretrained=null and backbone.size=tiny to build one from scratch."
        )
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation)


class CausalLMBackbone(nn.Module):
    """Causal LM + `num_queries` learnable query tokens whose last hidden states condition the generator."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_queries: int = 16,
        size: str | None = "tiny",
        pretrained: str | None = None,
        model_type: str = "qwen2",
        max_caption_tokens: int = 64,
        attn_implementation: str = "sdpa",
        config_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_caption_tokens = max_caption_tokens
        if pretrained is not None:
            self.lm = load_causal_lm(pretrained, attn_implementation)
            log.info("backbone: loaded %s from %s", type(self.lm).__name__, pretrained)
        else:
            if size not in LM_SIZES:
                raise ValueError(f"backbone.size={size!r} is not a known size; valid sizes: {', '.join(LM_SIZES)}")
            config = AutoConfig.for_model(
                model_type,
                vocab_size=len(tokenizer),
                max_position_embeddings=max_caption_tokens + num_queries,
                tie_word_embeddings=True,
                pad_token_id=tokenizer.pad_token_id,
                **{**LM_SIZES[size], **(config_overrides or {})},
            )
            self.lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
        if len(tokenizer) > self.lm.get_input_embeddings().num_embeddings:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens but the LM's embedding table only "
                f"{self.lm.get_input_embeddings().num_embeddings}; use the tokenizer saved with the model"
            )
        width = self.hidden_size
        # Initialised like token embeddings so queries start on the same scale as text.
        self.queries = nn.Parameter(torch.randn(num_queries, width) * self.lm.config.initializer_range)

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.lm.parameters()), "queries": [self.queries]}

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask, both `(B, L)`, on the backbone's device."""
        enc = self.tokenizer(
            list(captions), padding=True, truncation=True, max_length=self.max_caption_tokens, return_tensors="pt"
        )
        device = self.queries.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def condition(self, captions: list[str]) -> torch.Tensor:
        """Generation condition `(B, Q, D)`: the LM's last hidden states at the query positions."""
        ids, mask = self.tokenize(captions)
        text = self.lm.get_input_embeddings()(ids)
        batch = ids.shape[0]
        queries = self.queries.to(text.dtype).unsqueeze(0).expand(batch, -1, -1)
        inputs = torch.cat([text, queries], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, self.num_queries)], dim=1)
        # Positions count only real tokens, so a left-padded caption sees the same
        # positions as an unpadded one.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.lm.base_model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions).last_hidden_state
        return hidden[:, -self.num_queries :]

    def save_tokenizer(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(directory))
