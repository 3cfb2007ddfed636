"""Skipped samples reported where a user looks: one log line per epoch, and `data.skipped` in metrics.json."""

from __future__ import annotations

import logging

from lightning.pytorch.callbacks import Callback

from unizoo.data.skips import describe_skipped

log = logging.getLogger(__name__)


def skipped_samples(datamodule) -> dict[str, int]:
    """Reason -> samples the data module skipped so far (`{}` for a module that cannot have bad samples)."""
    skipped = getattr(datamodule, "skipped", None)
    return dict(skipped()) if skipped is not None else {}


class SkippedSamplesLog(Callback):
    """Logs the data module's skipped samples at the end of every training epoch that had any."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        skipped = skipped_samples(trainer.datamodule)
        if skipped and trainer.is_global_zero:
            log.warning("data: epoch %d: skipped %s so far in this run (bad files are never trained on)",
                        trainer.current_epoch, describe_skipped(skipped))
