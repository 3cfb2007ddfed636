"""Host tensors a step makes reach the device as queued copies (unizoo.runtime.transfer)."""

from __future__ import annotations

import pytest
import torch

from unizoo.runtime.transfer import to_device


def test_a_tensor_on_its_device_is_handed_back_as_it_is():
    ids = torch.arange(6).view(2, 3)
    assert to_device(ids, "cpu") is ids
    assert to_device(ids, torch.device("cpu")) is ids


def test_other_devices_take_a_plain_copy():
    ids = torch.arange(6).view(2, 3)
    moved = to_device(ids, "meta")  # no CUDA here: the path every device but CUDA takes
    assert moved.device.type == "meta" and moved.shape == ids.shape and moved.dtype == ids.dtype


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_host_tensor_reaches_cuda_without_a_wait():
    ids = torch.arange(64 * 20).view(64, 20)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            ids.to("cuda")  # the copy this replaces: it waits for the stream, and the mode sees it
        moved = to_device(ids, "cuda")
        del ids  # pinned memory stays with PyTorch's cache until the queued copy has run
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert moved.is_cuda and torch.equal(moved.cpu(), torch.arange(64 * 20).view(64, 20))
