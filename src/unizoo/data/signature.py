"""What identifies a data recipe's content, for cache keys."""

from __future__ import annotations

from typing import Any

import lightning as L

# Settings that change how data is served, never what it is (batch size stays:
# it changes what a pretraining run on this data learns).
_SERVING_ONLY = {"num_workers", "pin_memory", "persistent_workers"}


def data_signature(datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The data module's class, content-defining hyperparameters and (for files on disk) a fingerprint of the content."""
    hparams = {k: v for k, v in dict(getattr(datamodule, "hparams", {})).items() if k not in _SERVING_ONLY}
    # Data read from disk can change under the same path: its module says what identifies the content.
    content = {"content": datamodule.content_signature()} if hasattr(datamodule, "content_signature") else {}
    return {"class": f"{type(datamodule).__module__}.{type(datamodule).__qualname__}", **hparams, **content}
