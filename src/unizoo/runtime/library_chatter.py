"""Quiet the libraries' lines a unizoo user cannot act on, and only those.

Applied by the command line (every command), by `unizoo.training.train` when it is imported,
and by the benchmarks that drive a Lightning Trainer, so their logs read like a run's. Lightning's
own information (devices, precision, the model summary) stays.
"""

from __future__ import annotations

import logging
import warnings


class _NoTips(logging.Filter):
    """Drops Lightning's "💡 Tip:" lines (advertisements), nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_library_chatter() -> None:
    """Install the filters; calling it again adds nothing."""
    # Frozen components (the VAE, CLIP towers) stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
    # The training sampler resumes mid-epoch from the trainer's restored step (unizoo.data.sampler).
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # Lightning 2.6 builds torch's `LeafSpec()`, which torch 2.14 deprecates with a FutureWarning at every stage:
    # upstream's to change, nothing a unizoo user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
    # Lightning 2.6 advertises its hosted logger at the start of every stage that does not use it.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in rank_zero.filters):
        rank_zero.addFilter(_NoTips())
