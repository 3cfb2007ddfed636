"""The status file of a variant (``variants/<name>/status.json``): what a re-run of the study skips.

    submitted  the runner handed it to the launcher (``job_id``)
    running    its process started (``pid``); left behind by a process that was killed
    done       train() returned: skipped by a re-run
    failed     it raised (``error``: the last line of its error); run again by a re-run

Written atomically (a temporary file, then a rename), so a kill mid-write leaves the
previous state readable.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
SUBMITTED, RUNNING, DONE, FAILED = "submitted", "running", "done", "failed"


def read_status(folder: Path) -> dict[str, Any]:
    """The variant's last status; ``{"state": None}`` for one never started (or an unreadable file)."""
    try:
        return json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {"state": None}


def write_status(folder: Path, state: str, **fields: Any) -> dict[str, Any]:
    """Replace the status with ``state`` and ``fields``, keeping the earlier fields that are not replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    status = {**read_status(folder), **fields, "state": state, "updated": time.time()}
    temporary = folder / f".{STATUS_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps(status, indent=2))
    os.replace(temporary, folder / STATUS_FILE)
    return status


def process_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process (a zombie, killed but not yet reaped, counts as gone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
