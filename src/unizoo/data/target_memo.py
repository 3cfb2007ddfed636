"""A frozen representation's tokens of each training item, kept after their first encoding.

A stage that does not train the representation encodes every batch's images through it
(the frozen VAE encoder: 13% of the default recipe's step on a 2-core CPU), and after the
first epoch it encodes the same items again. The memo keeps each item's tokens, keyed by
its index in the training split, and later batches read them instead: the default
recipe's 1,500 steps of 64 are 1.9 epochs of its 50,000 items, so about half the encodes
go. It is the in-memory, automatic form of `unizoo cache-targets`, and rests on what that
does: a representation's tokens of an item are a function of the item (the VAE's
posterior mean, not a sample). They are also the same whatever else is in the batch
(checked to the bit for the default VAE on the CPU), so the memo changes no number.

* Only for map-style training sets, whose items have an index (shapes, folder): the
  training split is wrapped so that each item carries `"index"`. A streamed set
  (webdataset) has none, and every batch is encoded as before.
* Only while the representation is frozen: `reset(enabled)` at every stage start empties it,
  and a stage that trains the representation (REPA-E) never fills it.
* At most `MAX_BYTES` of tokens; past that, new items are encoded every time.
* Not with `targets=DIR`: those batches carry their tokens already.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch

from unizoo.data.with_targets import DatasetView, TrainSplitWrapped, indexable_train_set
from unizoo.errors import RecipeError
from unizoo.runtime.transfer import to_device

INDEX = "index"  # the batch key of the items' indices in the training split (a list of ints, on the host)
MAX_BYTES = 2 * 1024**3  # tokens kept at most: 2 GiB (the default recipe's 50,000 items take 26 MB in bf16)


class IndexedDataset(DatasetView):
    """`base[i]` plus `"index": i`, so that a batch names the items it holds."""

    def added(self, index: int) -> dict[str, Any]:
        return {INDEX: int(index)}


def index_training_items(datamodule: L.LightningDataModule) -> bool:
    """Make `datamodule`'s training batches carry their items' indices, where it can; whether it did."""
    try:
        indexable_train_set(datamodule, "target memo")
    except RecipeError:
        return False  # no map-style training set (webdataset): batches are encoded as they come
    if type(datamodule).on_before_batch_transfer is not L.LightningDataModule.on_before_batch_transfer:
        return False  # the data module's own hook: left as it is
    datamodule.dataset = TrainSplitWrapped(datamodule, IndexedDataset)
    if not isinstance(datamodule.train_dataloader().dataset, IndexedDataset):
        del datamodule.dataset  # a data module that builds its loader some other way keeps it
        return False
    # The data module's hook (Lightning calls it before moving a batch to the device), set on this
    # instance: a module-level function, so a data module pickled for spawned workers keeps it.
    datamodule.on_before_batch_transfer = indices_to_host
    return True


def indices_to_host(batch: Any, dataloader_idx: int = 0) -> Any:
    """The batch's item indices as a list of ints, which stays on the host when the batch moves to the device.

    The memo looks items up on the host; reading a device tensor there would make every step
    wait for the device.
    """
    if isinstance(batch, dict) and isinstance(batch.get(INDEX), torch.Tensor):
        batch = {**batch, INDEX: batch[INDEX].tolist()}
    return batch


class TargetMemo:
    """Each training item's tokens after their first encoding; `tokens(batch, encode)` reads or encodes them."""

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.reset(enabled=False)

    def reset(self, enabled: bool) -> None:
        """Empty it; `enabled`: whether the stage about to train keeps the representation frozen."""
        self.enabled = enabled
        self.rows: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self.read = self.encoded = 0  # items, since the reset

    def tokens(self, batch: dict[str, Any], encode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`encode(batch["image"])`, with the items already seen read from the memo."""
        indices = batch.get(INDEX)
        if not self.enabled or not isinstance(indices, list):
            return encode(batch["image"])
        missing = [position for position, index in enumerate(indices) if index not in self.rows]
        if len(missing) == len(indices):
            tokens = encode(batch["image"])
            self._keep(indices, tokens)
        else:
            rows = {}  # position in the batch -> its tokens, fresh ones first (a full memo keeps none of them)
            if missing:
                new = encode(batch["image"][to_device(torch.tensor(missing), batch["image"].device)])
                self._keep([indices[position] for position in missing], new)
                rows = dict(zip(missing, new, strict=True))
            tokens = torch.stack([rows[position] if position in rows else self.rows[index]
                                  for position, index in enumerate(indices)])
            self.read += len(indices) - len(missing)
        self.encoded += len(missing)
        return tokens

    def _keep(self, indices: list[int], tokens: torch.Tensor) -> None:
        tokens = tokens.detach()
        row_bytes = tokens[0].numel() * tokens.element_size() if len(tokens) else 0
        for index, row in zip(indices, tokens, strict=True):
            if self.bytes + row_bytes > self.max_bytes:
                return  # full: the items not kept are encoded each time they come
            self.rows[index] = row
            self.bytes += row_bytes

    def summary(self) -> str | None:
        """One line on what the memo saved since its reset; None where it did nothing."""
        if not self.enabled or not (self.read or self.encoded):
            return None
        total = self.read + self.encoded
        return (f"target memo: {self.read:,} of {total:,} training items ({100 * self.read / total:.0f}%) read the frozen "
                f"representation's tokens from memory instead of encoding them ({len(self.rows):,} items kept, "
                f"{self.bytes / 1e6:.1f} MB)")
