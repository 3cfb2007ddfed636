"""Local pretrained weights: every `pretrained:` recipe value is a path on this machine.

unizoo never downloads (`from_pretrained` only ever sees a local path), so a missing
path is a user's mistake that deserves one clear sentence: which key, which path,
what belongs there and what to do instead.
"""

from __future__ import annotations

import os
from pathlib import Path


def local_weights(pretrained: str | os.PathLike, key: str, expected: str, instead: str, directory: bool = False) -> Path:
    """`pretrained` as a Path, or FileNotFoundError naming `key`, the path, what is `expected` there and the alternative.

    `directory`: it must be a directory (a `save_pretrained` folder), not just exist.
    """
    path = Path(pretrained).expanduser()
    if not (path.is_dir() if directory else path.exists()):
        problem = "is not a directory" if directory and path.exists() else "does not exist"
        raise FileNotFoundError(f"{key}={str(pretrained)!r} {problem}. Point it at {expected}; or {instead}.")
    return path
