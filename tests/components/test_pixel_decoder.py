"""The CLIP-to-pixel decoder's training on noise-augmented features (RAE)."""

from __future__ import annotations

import torch

from unizoo.components.representations.pixel_decoder import PixelDecoder
from unizoo.pretraining.cache import content_hash
from unizoo.pretraining.pixel_decoder import augment_with_noise

TINY_VAE = {"autoencoder": {"block_out_channels": [16, 16, 16]}}


def test_noise_augmentation_draws_a_noise_level_per_image():
    torch.manual_seed(0)
    features = torch.zeros(4000, 16, 8)
    noisy = augment_with_noise(features, noise_std=0.5)
    per_image = noisy.reshape(4000, -1).std(1)
    # The std of each image's noise is |N(0, 0.5^2)|: mean 0.5 * sqrt(2 / pi) ~= 0.399, and it varies between images.
    assert abs(per_image.mean().item() - 0.5 * (2 / torch.pi) ** 0.5) < 0.02
    assert per_image.std().item() > 0.2
    # Within an image the noise is Gaussian around the features with that one std.
    assert noisy.mean().abs().item() < 0.01


def test_noise_level_is_part_of_the_decoders_identity():
    # A decoder trained on noisy features is another model: another cache entry.
    clean = PixelDecoder((64, 32), vae=TINY_VAE, generator={"depth": 1}, training={"noise_std": 0.0})
    noisy = PixelDecoder((64, 32), vae=TINY_VAE, generator={"depth": 1}, training={"noise_std": 0.5})
    default = PixelDecoder((64, 32), vae=TINY_VAE, generator={"depth": 1})
    assert content_hash(clean.config) != content_hash(noisy.config)
    assert content_hash(clean.config) == content_hash(default.config)
