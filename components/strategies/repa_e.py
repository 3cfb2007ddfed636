"""REPA-E (Leng et al., arXiv 2504.10483): one stage that trains the VAE end to end with the generator.

Trained end to end on the diffusion loss alone, a VAE learns latents that are easy to
denoise and useless to decode (the paper's collapse). REPA-E instead lets the REPA
alignment loss reach the VAE, and keeps the diffusion loss away from it:

* `generation`: the objective's loss on the VAE's latents cut from their graph, plus the
  alignment's REPA term: trains the backbone, its queries, the generator and REPA's head;
* `representation_alignment`: REPA's loss of a pass of the generator, held fixed, on the
  latents with their graph: trains the VAE alone (weight 1.5, the paper's);
* `reconstruction`: the VAE's own loss (L1 + MSE + KL, as it was pretrained), so it stays
  an autoencoder (the paper's adds LPIPS and a GAN term, which the tiny VAE never had).

`recipes/strategy/repa_e.yaml` also selects `alignment=repa` and the latents' batch norm
(`representation.latent_norm=batch`), which REPA-E uses instead of a fixed scaling factor
because the latents' statistics move as the VAE trains. Only a representation that names
a "representation" parameter group can train here: the VAE.
"""

from __future__ import annotations

from unizoo.components.strategies.stages import Stage, Strategy

STAGE = "end_to_end"


def repa_e(
    steps: int = 1500,
    representation_alignment_weight: float = 1.5,
    reconstruction_weight: float = 1.0,
    representation_lr_scale: float = 1.0,
) -> Strategy:
    """`representation_lr_scale`: the VAE's learning rate as a multiple of the recipe's (REPA-E: the same rate, 1)."""
    return Strategy(
        name="repa_e",
        stages=(
            Stage(
                name=STAGE,
                losses={
                    "generation": 1.0,
                    "representation_alignment": representation_alignment_weight,
                    "reconstruction": reconstruction_weight,
                },
                trainable=("backbone", "queries", "generator", "representation"),
                steps=steps,
                learning_rates={"representation": representation_lr_scale},
            ),
        ),
    )
