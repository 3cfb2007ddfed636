"""CLIP patch features as the generation target (BLIP3-o's "CLIP + flow matching"), frozen.

`encode(images (B, 3, H, W) in [-1, 1]) -> tokens (B, N, C)`: the vision tower's patch
tokens (no CLS) from hidden layer `feature_layer`, optionally average-pooled on the
square grid to `pool_to` tokens, normalised to unit scale. N = grid² (or `pool_to`),
C = the tower's width. Towers: transformers CLIP/SigLIP vision models from a local
directory, timm EVA-CLIP towers (what BLIP3-o uses), or, on the embedded default, a
tiny CLIP unizoo pretrains contrastively on the recipe's data and caches by content
hash. Features are not pixels: `decode` needs a trained CLIP-to-pixel decoder.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, CLIPModel, CLIPVisionModel

from unizoo.components.representations.feature_normalisation import check_normalisation, fit_normalisation, rounded
from unizoo.components.representations.pixel_decoder import PixelDecoder
from unizoo.config.recipe_types import ArgumentsOf
from unizoo.config.weights import local_weights
from unizoo.data.signature import data_signature
from unizoo.pretraining.cache import cached_directory
from unizoo.pretraining.clip import (
    CLIP_MEAN,
    CLIP_STD,
    TinyCLIPOverrides,
    clip_tokenizer,
    preprocess,
    save_clip,
    tiny_clip_config,
    train_clip,
)

log = logging.getLogger(__name__)

# Vision towers transformers can serve, with their prefix (CLS) token count and, for a
# directory without a preprocessor_config.json, the pixel statistics they were trained with.
_TRANSFORMERS_TOWERS: dict[str, tuple[int, tuple[float, ...], tuple[float, ...]]] = {
    "clip_vision_model": (1, CLIP_MEAN, CLIP_STD),
    "siglip_vision_model": (0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# Weight files a timm / open_clip checkpoint directory may hold, in order of preference.
_TIMM_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _public(config: Any) -> Any:
    """A config dict without bookkeeping: private keys (some set-ordered) and the library version."""
    if isinstance(config, dict):
        return {k: _public(v) for k, v in config.items() if not str(k).startswith("_") and k != "transformers_version"}
    return config


def _local_path(pretrained: str, what: str) -> Path:
    return local_weights(
        pretrained,
        "representation.pretrained",
        what,
        "set representation.pretrained=null (with tower=transformers) to let unizoo pretrain a tiny CLIP on the recipe's data",
    )


class CLIPRepresentation(nn.Module):
    """Frozen CLIP-family patch features, optionally pooled, normalised to unit scale."""

    def __init__(
        self,
        image_size: int = 32,
        tower: str = "transformers",
        pretrained: str | None = None,
        timm_model: str | None = None,
        timm_kwargs: dict[str, Any] | None = None,
        pool_to: int | None = None,
        normalize: Literal["channel", "scalar", "none"] | bool = "channel",
        feature_layer: int = -1,
        clip: TinyCLIPOverrides | None = None,
        pretraining: Annotated[dict[str, Any] | None, ArgumentsOf(train_clip)] = None,
        decoder: Annotated[dict[str, Any] | None, ArgumentsOf(PixelDecoder)] = None,
    ) -> None:
        super().__init__()
        self.image_size, self.tower, self.pretrained = image_size, tower, pretrained
        # true / false: the values of recipes written before per-channel normalisation existed.
        normalize = {True: "scalar", False: "none"}.get(normalize, normalize) if isinstance(normalize, bool) else normalize
        self.normalize, self.feature_layer, self.clip = check_normalisation(normalize), feature_layer, dict(clip or {})
        # Every setting spelled out, so the recipe and the Python default share one cache key.
        self.pretraining = {"steps": 1000, "lr": 2e-3, "weight_decay": 0.05, "warmup_steps": 50, **(pretraining or {})}
        if tower == "transformers":
            self._build_transformers_tower()
        elif tower == "timm":
            self._build_timm_tower(timm_model, dict(timm_kwargs or {}))
        else:
            raise ValueError(f"representation.tower={tower!r}: expected 'transformers' or 'timm'")
        self.vision.requires_grad_(False).eval()
        self.pool_to = pool_to
        self._check_pooling()
        # Buffers, so a run's checkpoint carries the normalisation with the weights: (C,) per channel, () otherwise.
        statistics_shape = (self.width,) if normalize == "channel" else ()
        self.register_buffer("feature_shift", torch.zeros(statistics_shape))
        self.register_buffer("feature_scale", torch.ones(statistics_shape))
        # Features -> pixels (BLIP3-o's diffusion decoder); None for an encoder-only use,
        # such as the understanding path's vision encoder.
        self.decoder = PixelDecoder(self.token_shape, **decoder, image_size=image_size) if decoder is not None else None

    def _build_transformers_tower(self) -> None:
        if self.pretrained is None:
            # Random until `prepare` loads (or pretrains) the tiny CLIP; shapes are already final.
            config = tiny_clip_config(self.image_size, self.clip).vision_config
            self.vision, mean, std = CLIPVisionModel(config), CLIP_MEAN, CLIP_STD
        else:
            path = _local_path(
                self.pretrained,
                "a local transformers CLIP/SigLIP directory (config.json + weights, e.g. written by "
                "`CLIPModel.save_pretrained(DIR)` or `SiglipVisionModel.save_pretrained(DIR)`)",
            )
            if not path.is_dir():
                raise FileNotFoundError(f"representation.pretrained={str(path)!r} is a file; tower=transformers needs a save_pretrained directory")
            config = AutoConfig.from_pretrained(path)
            model_type = getattr(config, "vision_config", config).model_type
            if model_type not in _TRANSFORMERS_TOWERS:
                raise ValueError(f"{path}: vision tower {model_type!r} is not supported; expected one of {sorted(_TRANSFORMERS_TOWERS)}")
            model = AutoModel.from_pretrained(path)
            # A full CLIPModel / SiglipModel directory: keep only its vision tower.
            self.vision = getattr(model, "vision_model", model)
            _, mean, std = _TRANSFORMERS_TOWERS[model_type]
            processor = path / "preprocessor_config.json"
            if processor.is_file():
                stats = json.loads(processor.read_text())
                mean, std = tuple(stats.get("image_mean", mean)), tuple(stats.get("image_std", std))
        config = self.vision.config
        self.num_prefix_tokens = _TRANSFORMERS_TOWERS[config.model_type][0]
        self.tower_image_size, self.grid, self.width = config.image_size, config.image_size // config.patch_size, config.hidden_size
        self.pixel_mean, self.pixel_std = tuple(mean), tuple(std)
        layers = config.num_hidden_layers
        if not -(layers + 1) <= self.feature_layer <= layers:
            raise ValueError(f"feature_layer={self.feature_layer} is out of range for a {layers}-layer tower (hidden states -{layers + 1}..{layers})")

    def _build_timm_tower(self, timm_model: str | None, kwargs: dict[str, Any]) -> None:
        # Imported here, not with the module: timm's import (wandb's with it) costs 0.7 s of every
        # `unizoo train`, which imports this module for the evaluator whatever the representation.
        import timm

        if not timm_model:
            raise ValueError("representation.tower='timm' needs representation.timm_model (e.g. 'eva02_large_patch14_clip_224')")
        kwargs.setdefault("num_classes", 0)  # features only: no classifier head
        if self.pretrained is None:
            self.vision = timm.create_model(timm_model, pretrained=False, **kwargs)
        else:
            path = _local_path(self.pretrained, f"a local timm/open_clip weight file for {timm_model!r} (or a directory holding one of {_TIMM_WEIGHT_FILES})")
            if path.is_dir():
                found = [path / name for name in _TIMM_WEIGHT_FILES if (path / name).is_file()]
                if not found:
                    raise FileNotFoundError(f"{path} holds none of {_TIMM_WEIGHT_FILES}")
                path = found[0]
            # timm's own loader: it applies the model's checkpoint filter (open_clip EVA key
            # names, position-embedding resampling) and drops a mismatched classifier.
            self.vision = timm.create_model(timm_model, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
        cfg = self.vision.pretrained_cfg
        self.num_prefix_tokens = self.vision.num_prefix_tokens
        self.tower_image_size, self.grid = self.vision.patch_embed.img_size[0], self.vision.patch_embed.grid_size[0]
        self.width = self.vision.num_features
        self.pixel_mean, self.pixel_std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
        blocks = len(self.vision.blocks)
        if not -blocks <= self.feature_layer < blocks:
            raise ValueError(f"feature_layer={self.feature_layer} is out of range for a {blocks}-block tower (-{blocks}..{blocks - 1})")

    def _check_pooling(self) -> None:
        if self.pool_to is None:
            return
        side = math.isqrt(self.pool_to)
        if self.pool_to < 1 or side * side != self.pool_to or self.grid % side:
            raise ValueError(
                f"representation.pool_to={self.pool_to} must be a square number whose side divides the tower's "
                f"{self.grid}x{self.grid} patch grid: one of {[d * d for d in range(1, self.grid + 1) if self.grid % d == 0]}, or null"
            )

    @property
    def token_shape(self) -> tuple[int, int]:
        """(N, C) of `encode`'s output."""
        return (self.pool_to or self.grid * self.grid), self.width

    def train(self, mode: bool = True) -> "CLIPRepresentation":
        # Frozen: Lightning's .train() must not switch the tower's dropout / norm layers.
        super().train(mode)
        self.vision.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """None: the tower is frozen in every stage (no stage can name it)."""
        return {}

    def cache_signature(self, datamodule: L.LightningDataModule) -> dict[str, Any]:
        """Everything that decides the pretrained tiny CLIP: the cache key hashes this."""
        vocabulary = list(datamodule.vocabulary())
        config = tiny_clip_config(self.image_size, self.clip, clip_tokenizer(vocabulary))
        return {
            "clip": _public(config.to_dict()),
            "vocabulary": vocabulary,
            "pixels": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
            "pretraining": self.pretraining,
            "data": data_signature(datamodule),
        }

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Make the weights real (load or pretrain the cached tiny CLIP unless `pretrained`), then fit the normalisation."""
        datamodule.setup("fit")
        if self.pretrained is None:
            if self.tower != "transformers":
                raise ValueError(
                    "representation.tower='timm' needs representation.pretrained (a local weight file): unizoo "
                    "pretrains only the tiny transformers CLIP (tower=transformers, pretrained=null)"
                )
            self._load_tiny_clip(datamodule)
        else:  # the log says where the weights came from in every case (cached, pretrained now, or given)
            log.info("representation: using the %s vision tower at %s (representation.pretrained)", self.tower, self.pretrained)
        if self.normalize != "none":
            self._fit_normalisation(datamodule)
        if self.decoder is not None:
            # The decoder depends on exactly these features: the tower's weights and the fitted normalisation.
            features = {
                "tower": self.cache_signature(datamodule) if self.pretrained is None else {"pretrained": str(self.pretrained)},
                "feature_layer": self.feature_layer,
                "pool_to": self.pool_to,
                "normalisation": {"kind": self.normalize, "shift": rounded(self.feature_shift), "scale": rounded(self.feature_scale)},
            }
            self.decoder.prepare(datamodule, self, features)

    def tiny_clip_directory(self, datamodule: L.LightningDataModule) -> Path:
        """The cached tiny CLIP of this recipe and data (pretrained now if missing): a complete
        `CLIPModel` directory with both towers, its tokenizer and pixel statistics."""
        signature = self.cache_signature(datamodule)
        tokenizer = clip_tokenizer(signature["vocabulary"])

        def build(directory: Path) -> None:
            with torch.enable_grad():
                model = CLIPModel(tiny_clip_config(self.image_size, self.clip, tokenizer))
                train_clip(model, tokenizer, datamodule.train_dataloader(), **self.pretraining, seed=0)
            save_clip(model, tokenizer, directory)

        entry, reused = cached_directory("clip", signature, build)
        log.info("%s the tiny CLIP at %s", "reusing" if reused else "pretrained and cached", entry)
        return entry

    def _load_tiny_clip(self, datamodule: L.LightningDataModule) -> None:
        entry = self.tiny_clip_directory(datamodule)
        self.vision.load_state_dict(CLIPModel.from_pretrained(entry).vision_model.state_dict())

    def _fit_normalisation(self, datamodule: L.LightningDataModule) -> None:
        fit_normalisation(self, datamodule.train_dataloader())
        log.info("representation: CLIP features normalised per %s (mean shift %.4f, mean scale %.4f)",
                 "channel" if self.normalize == "channel" else "tensor", self.feature_shift.mean(), self.feature_scale.mean())

    def _patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tower input `(B, 3, S, S)` -> patch tokens `(B, grid², C)` of layer `feature_layer`, prefix tokens dropped."""
        if self.tower == "timm":
            if self.feature_layer == -1:
                return self.vision.forward_features(pixels)[:, self.num_prefix_tokens :]
            # forward_intermediates drops the prefix tokens itself.
            return self.vision.forward_intermediates(pixels, indices=[self.feature_layer], output_fmt="NLC", intermediates_only=True)[0]
        if self.feature_layer == -1:
            hidden = self.vision(pixel_values=pixels).last_hidden_state
        else:
            hidden = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[self.feature_layer]
        return hidden[:, self.num_prefix_tokens :]

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(B, grid², C) -> (B, pool_to, C)`: 2-D average pooling of the row-major square grid."""
        if self.pool_to is None:
            return tokens
        b, n, c = tokens.shape
        grid = tokens.transpose(1, 2).reshape(b, c, self.grid, self.grid)
        pooled = F.avg_pool2d(grid, kernel_size=self.grid // math.isqrt(self.pool_to))
        return pooled.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] -> tokens `(B, N, C)` (normalised patch features)."""
        dtype = next(self.vision.parameters()).dtype
        pixels = preprocess(images, self.tower_image_size, self.pixel_mean, self.pixel_std).to(dtype)
        tokens = self.pool(self._patch_tokens(pixels))
        return (tokens - self.feature_shift) * self.feature_scale

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens `(B, N, C)` -> images `(B, 3, H, W)` in [-1, 1], through a trained CLIP-to-pixel decoder."""
        if self.decoder is None:
            raise RuntimeError(
                "CLIP features are not pixels: turning generated CLIP tokens into images needs a CLIP-to-pixel "
                "decoder (BLIP3-o uses a diffusion decoder conditioned on them). Set representation.decoder to the "
                "decoder recipe (representation.decoder=${decoder}, recipes/decoder/) and unizoo trains and caches "
                "it in prepare(); or use representation=vae, whose latents decode by themselves."
            )
        return self.decoder.decode(tokens)
