"""Atomic checkpoint writes, and finding the newest complete checkpoint after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from unizoo.training import checkpoints
from unizoo.training.checkpoints import AtomicCheckpointIO, last_good_checkpoint, newest_step, readable


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies_half_way(obj, file):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a signal looks like mid-write

    monkeypatch.setattr(checkpoints.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=False)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temporary file is gone


def test_a_kill_during_saves_leaves_a_readable_checkpoint(tmp_path):
    # A real SIGKILL while the process rewrites a checkpoint again and again.
    path = tmp_path / "last.ckpt"
    code = (
        "import sys, torch; from unizoo.training.checkpoints import AtomicCheckpointIO\n"
        f"io, path = AtomicCheckpointIO(), {str(path)!r}\n"
        "for step in range(10**6):\n"
        "    io.save_checkpoint({'step': step, 'w': torch.full((4_000_000,), float(step))}, path)\n"
        "    print(step, flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "0"
    time.sleep(0.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    saved = torch.load(path, weights_only=False)
    assert saved["w"].eq(saved["step"]).all()
    assert readable(path)


def test_readable_tells_complete_from_truncated(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"w": torch.ones(1000)}, path)
    assert readable(path)
    path.write_bytes(path.read_bytes()[:-100])
    assert not readable(path)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert not readable(tmp_path / "junk.ckpt") and not readable(tmp_path / "missing.ckpt")


def test_last_good_checkpoint_prefers_last_then_newest_step(tmp_path):
    assert last_good_checkpoint(tmp_path / "nowhere") is None and last_good_checkpoint(tmp_path) is None
    for name in ("step2.ckpt", "step10.ckpt", "last.ckpt"):
        torch.save({"name": name}, tmp_path / name)
    (tmp_path / ".last.ckpt.99.tmp").write_bytes(b"PK half")
    assert last_good_checkpoint(tmp_path) == tmp_path / "last.ckpt"
    assert newest_step(tmp_path) == 10
    (tmp_path / "last.ckpt").write_bytes(b"PK truncated")
    assert last_good_checkpoint(tmp_path) == tmp_path / "step10.ckpt"  # by step number, not by name
    (tmp_path / "step10.ckpt").unlink()
    assert last_good_checkpoint(tmp_path) == tmp_path / "step2.ckpt"
