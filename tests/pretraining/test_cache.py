"""The pretrained-model cache: content-addressed entries, built once even when processes ask at once."""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

import pytest

from unizoo.pretraining.cache import cached_directory, content_hash

SIGNATURE = {"kind": "test", "steps": 3}


def _build_slowly(tmp: Path, builds: Path) -> None:
    with open(builds, "a") as handle:  # one line per build, whichever process ran it
        handle.write("built\n")
    time.sleep(1.0)  # long enough that the other process asks while this one builds
    (tmp / "weights.txt").write_text("the weights")


def _ask(cache: str, builds: str, results) -> None:
    import os

    os.environ["UNIZOO_CACHE"] = cache
    entry, was_there = cached_directory("test", SIGNATURE, lambda tmp: _build_slowly(tmp, Path(builds)))
    results.put((str(entry), was_there, (entry / "weights.txt").read_text()))


def test_an_entry_is_built_once_and_found_after(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path))
    calls = []
    first, was_there = cached_directory("test", SIGNATURE, lambda tmp: calls.append(tmp) or (tmp / "w").write_text("1"))
    again, was_there_again = cached_directory("test", SIGNATURE, lambda tmp: calls.append(tmp))
    assert (was_there, was_there_again, len(calls), first) == (False, True, 1, again)
    assert (first / "signature.json").is_file() and (first / "w").read_text() == "1"


def test_a_failed_build_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIZOO_CACHE", str(tmp_path))

    def fail(tmp: Path) -> None:
        (tmp / "half").write_text("half written")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        cached_directory("test", SIGNATURE, fail)
    assert not list((tmp_path / "test").iterdir())  # no entry, no temporary folder, and the lock lives apart
    assert [p.name for p in (tmp_path / ".locks" / "test").iterdir()] == [f"{content_hash(SIGNATURE)}.lock"]


@pytest.mark.skipif(sys.platform == "win32", reason="the build lock is POSIX flock")
def test_two_processes_asking_at_once_build_the_entry_once(tmp_path):
    builds = tmp_path / "builds.log"
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_ask, args=(str(tmp_path / "cache"), str(builds), results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    answers = sorted(results.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert builds.read_text() == "built\n"  # one build between them
    assert [was_there for _, was_there, _ in answers] == [False, True]
    assert {(entry, weights) for entry, _, weights in answers} == {(answers[0][0], "the weights")}
