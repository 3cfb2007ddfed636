"""Host tensors that a training step makes reach the device without making the host wait.

A plain `tensor.to("cuda")` from ordinary (pageable) host memory is a copy followed by a wait
for the stream: PyTorch synchronises after it, so the host sits idle until every kernel queued
before the copy has run, and cannot queue the step's next kernels meanwhile. The caption's token
ids, which the tokenizer makes on the host at every step, would cost that wait twice a step.
From pinned (page-locked) memory with `non_blocking=True` the copy is queued like a kernel and
the host goes on; PyTorch's pinned-memory cache keeps the host buffer until the copy has run,
so the tensor handed in may be freed at once. Lightning moves the batch itself the same way.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`: a queued copy from pinned memory for host -> CUDA, `tensor.to(device)` otherwise."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
