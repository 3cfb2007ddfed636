"""A causal LM backbone with learnable query tokens (MetaQuery / BLIP3-o) and an image input.

Generation: the caption is embedded by the LM's own embedding table, `Q` learnable
query embeddings are appended after it, and the LM's last hidden states at the query
positions become the generation condition `(B, Q, D)`.

Understanding (image -> caption, LLaVA-style): a frozen vision encoder (any
representation, by default the CLIP image tower) gives patch tokens, a 2-layer MLP
projector maps them into the LM's embedding space as a prefix, and the LM is trained
with the next-token loss on the caption.

Any `AutoModelForCausalLM` works: built from a config (`tiny` preset, for tests and
the embedded default) or loaded from a local directory with `from_pretrained`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from unizoo.config.weights import local_weights
from unizoo.runtime.fabric import loop_device
from unizoo.runtime.transfer import to_device
from unizoo.text.caption_ids import CaptionIds

log = logging.getLogger(__name__)

# Named LM sizes for building from scratch (Qwen2 family). A real run points
# `pretrained` at a local directory instead.
LM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "base": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}


def attention_implementation(choice: str) -> str:
    """transformers' `attn_implementation` for `choice`; `auto`: `sdpa` on a GPU, `eager` on the CPU.

    On the CPU, PyTorch's flash kernel behind `sdpa` is slow in backward at the tiny LM's head
    sizes: with `eager` the default recipe's training step went from 225 to 205 ms on a 2-core
    Xeon (bf16). On a GPU sdpa is the fast one.
    """
    if choice != "auto":
        return choice
    return "sdpa" if loop_device().type == "cuda" else "eager"


def load_causal_lm(pretrained: str | os.PathLike, attn_implementation: str = "sdpa") -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained` on a local directory, with a useful error when it is missing."""
    path = local_weights(
        pretrained,
        "backbone.pretrained",
        "a local directory holding a transformers causal LM (config.json + weights), e.g. one written by "
        "`model.save_pretrained(DIR)` or `huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir DIR` on a machine "
        "with network access",
        "set backbone.pretrained=null and backbone.size=tiny to build one from scratch",
        directory=True,
    )
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation)


def lm_attention_mask(lm: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """What the LM's forward takes as `attention_mask` for padding `mask (B, T)` (1 = real token), causal.

    For sdpa the `(B, 1, T, T)` boolean mask, built here on the device: given the 2D mask,
    transformers first asks whether it may drop the mask for sdpa's `is_causal`, and answers by
    reading the padding mask on the host (`fast_all` in its masking utilities), a wait for the
    device at every call of an eager step on a GPU; a 4D mask it takes as it is. It is the mask
    transformers builds itself, so the numbers are the same. Other implementations keep the 2D
    mask (eager's additive mask is transformers' to build, and it reads nothing on the host).
    """
    if lm.config._attn_implementation != "sdpa":
        return mask
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    return causal & mask.bool()[:, None, None, :]


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
        attn_implementation: str = "auto",
        config_overrides: dict[str, Any] | None = None,
        vision_encoder: nn.Module | None = None,
        max_new_tokens: int = 24,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_caption_tokens = max_caption_tokens
        # Captions as ids, each caption encoded once: the tokenizer runs on the host at every step. The
        # understanding loss reads them without special tokens (it places BOS and EOS itself).
        self.caption_ids = CaptionIds(tokenizer, max_caption_tokens)
        self.caption_bodies = CaptionIds(tokenizer, max_caption_tokens, add_special_tokens=False)
        attn_implementation = attention_implementation(attn_implementation)
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
        self.vision_encoder = vision_encoder
        self.max_new_tokens = max_new_tokens
        self.projector = None
        if vision_encoder is not None:
            # LLaVA-1.5's projector: two linear layers with a GELU between them.
            features = vision_encoder.token_shape[1]
            self.projector = nn.Sequential(nn.Linear(features, width), nn.GELU(), nn.Linear(width, width))

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    @property
    def language_model(self) -> nn.Module:
        """The LM's transformer stack, without its head: every call of the backbone runs through it
        (what `compile` compiles, unizoo.runtime.compilation)."""
        return self.lm.base_model

    @property
    def num_queries(self) -> int:
        return self.queries.shape[0]

    @property
    def understands_images(self) -> bool:
        return self.projector is not None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable groups; the vision encoder is a frozen representation and is in none."""
        groups = {"backbone": list(self.lm.parameters()), "queries": [self.queries]}
        if self.projector is not None:
            groups["projector"] = list(self.projector.parameters())
        return groups

    def prepare(self, datamodule) -> None:
        """Make the vision encoder's weights real (it may pretrain and cache itself)."""
        if self.vision_encoder is not None:
            self.vision_encoder.prepare(datamodule)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask, both `(B, L)`, on the backbone's device."""
        ids, mask = self.caption_ids(captions)
        device = self.queries.device
        # Made on the host at every step: queued copies, so the step does not wait for the device here.
        return to_device(ids, device), to_device(mask, device)

    def _generation_inputs(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The LM's input for generation: caption embeddings then the queries `(B, T, D)`, T = L + Q,
        with the attention mask `(B, T)` (0 on the caption's left padding) and the position ids `(B, T)`."""
        ids, mask = self.tokenize(captions)
        text = self.lm.get_input_embeddings()(ids)
        batch = ids.shape[0]
        queries = self.queries.to(text.dtype).unsqueeze(0).expand(batch, -1, -1)
        inputs = torch.cat([text, queries], dim=1)
        mask = torch.cat([mask, mask.new_ones(batch, self.num_queries)], dim=1)
        # Positions count only real tokens, so a left-padded caption sees the same
        # positions as an unpadded one.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return inputs, mask, positions

    def condition(self, captions: list[str]) -> torch.Tensor:
        """Generation condition `(B, Q, D)`: the LM's last hidden states at the query positions."""
        return self._read_generation_inputs(*self._generation_inputs(captions))[:, -self.num_queries :]

    def _read_generation_inputs(self, inputs: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The language model's last hidden states `(B, T, D)` over what `_generation_inputs` returned."""
        # use_cache=False here and in every training pass: one pass reads the whole input, and the key/value
        # cache transformers builds by default would copy every layer's keys and values for nothing.
        return self.lm.base_model(inputs_embeds=inputs, attention_mask=lm_attention_mask(self.lm, mask), position_ids=positions,
                                  use_cache=False).last_hidden_state

    def hidden_states(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's hidden states over the whole generation input, for deeper conditioning.

        Returns `(states (B, S, T, D), mask (B, T))`: S = the LM's layers (the output of each, the
        last one after the final norm, so `states[:, -1, -Q:]` is `condition`'s; the embedding
        layer's output is left out: it has read nothing of the caption), T = the caption's L
        tokens, left-padded to the longest caption of the batch, then the Q queries; the mask
        is True at real tokens, False at padding.
        """
        inputs, mask, positions = self._generation_inputs(captions)
        # The layers' outputs are read by hooks removed again at once, not with transformers'
        # `output_hidden_states`: that installs hooks of local functions for good, and a model
        # holding them can no longer be pickled (data-parallel training spawns it).
        layers = self._decoder_layers()
        states: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(lambda module, args, out: states.append(out[0] if isinstance(out, tuple) else out))
                   for layer in layers[:-1]]
        try:
            last = self._read_generation_inputs(inputs, mask, positions)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack([*states, last], dim=1), mask.bool()

    def _decoder_layers(self) -> nn.ModuleList:
        """The LM's stack of decoder layers: the ModuleList of `num_hidden_layers` modules in its base model."""
        count = self.lm.config.num_hidden_layers
        for module in self.lm.base_model.children():
            if isinstance(module, nn.ModuleList) and len(module) == count:
                return module
        raise RuntimeError(f"found no stack of {count} decoder layers in {type(self.lm.base_model).__name__} to read hidden states from")

    # ------------------------------------------------------------ understanding
    def _require_vision(self) -> None:
        if self.projector is None:
            raise RuntimeError(
                "this backbone has no vision encoder, so it cannot read images: set backbone.vision_encoder "
                "in the recipe (e.g. the CLIP image tower) to train or evaluate understanding"
            )

    def image_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` -> projected patch tokens `(B, P, D)` in the LM's embedding space."""
        self._require_vision()
        features = self.vision_encoder.encode(images)
        return self.projector(features.to(self.projector[0].weight.dtype))

    def understanding_targets(self, captions: list[str], num_prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the next-token loss reads after `num_prefix` image tokens, on the host, right-padded:
        the caption ids `(B, L)` (BOS where the tokenizer has one, the caption, EOS), the labels
        `(B, P + L)` (-100 on the prefix, BOS and padding: never predicted) and the attention mask
        `(B, P + L)`.

        Built as lists and made tensors once: per-row tensor writes were three operators a caption
        on the host at every understanding step.
        """
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        sequences = [bos + body + [self.tokenizer.eos_token_id] for body in self.caption_bodies.rows(captions)]
        length = max(map(len, sequences))
        skip = len(bos)  # BOS is given, never predicted
        pad = self.tokenizer.pad_token_id
        ids = [sequence + [pad] * (length - len(sequence)) for sequence in sequences]
        labels = [[-100] * (num_prefix + skip) + sequence[skip:] + [-100] * (length - len(sequence)) for sequence in sequences]
        mask = [[1] * (num_prefix + len(sequence)) + [0] * (length - len(sequence)) for sequence in sequences]
        return tuple(torch.tensor(rows, dtype=torch.long) for rows in (ids, labels, mask))

    def understanding_loss(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Next-token loss of the caption given the image prefix (prefix and BOS are not predicted)."""
        prefix = self.image_prefix(images)
        ids, labels, mask = self.understanding_targets(captions, num_prefix=prefix.shape[1])
        device = prefix.device
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(to_device(ids, device))], dim=1)
        # Right padding: positions are plain 0..T-1 and the HF loss shifts labels itself.
        mask = lm_attention_mask(self.lm, to_device(mask, device))
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=to_device(labels, device), use_cache=False).loss

    @torch.no_grad()
    def caption(self, images: torch.Tensor, max_new_tokens: int | None = None) -> list[str]:
        """Greedy captions of images `(B, 3, H, W)` in [-1, 1]."""
        prefix = self.image_prefix(images)
        batch = prefix.shape[0]
        inputs = prefix
        if self.tokenizer.bos_token_id is not None:
            bos = torch.full((batch, 1), self.tokenizer.bos_token_id, dtype=torch.long, device=prefix.device)
            inputs = torch.cat([prefix, self.lm.get_input_embeddings()(bos)], dim=1)
        output = self.lm.generate(
            inputs_embeds=inputs,
            attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device),
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]

    def save_tokenizer(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(str(directory))
