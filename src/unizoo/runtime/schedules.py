"""Learning-rate schedules shared by every training loop in unizoo."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, final_fraction: float = 0.1) -> Callable[[int], float]:
    """LR multiplier for `LambdaLR`: linear warm-up, then cosine decay to `final_fraction`."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier
