"""What identifies a data recipe's content, for cache keys."""

from __future__ import annotations

from typing import Any

import lightning as L

# Settings that change how data is served, never what it is (batch size stays:
# it changes what a pretraining run on this data learns).
_SERVING_ONLY = {"num_workers", "pin_memory", "persistent_workers"}


def data_signature(datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The data module's class and content-defining hyperparameters."""
    hparams = {k: v for k, v in dict(getattr(datamodule, "hparams", {})).items() if k not in _SERVING_ONLY}
    return {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", **hparams}
