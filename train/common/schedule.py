"""Learning-rate schedules as multiplicative factors (for ``torch.optim.lr_scheduler.LambdaLR``)."""
from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total_steps``; 0 before ``start_step``.

    A callable object rather than a closure so that ``LambdaLR.state_dict()`` records its settings and a resumed run
    can check it continues the same schedule. Warmup uses ``(s + 1) / (warmup + 1)`` so the very first step already
    learns (a factor of exactly 0 would waste it) and the peak is reached at ``s = warmup``.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.1, start_step: int = 0) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio
        self.start_step = start_step

    def __call__(self, step: int) -> float:
        s = step - self.start_step
        if s < 0:
            return 0.0
        if s < self.warmup_steps:
            return (s + 1) / (self.warmup_steps + 1)
        decay_steps = max(1, self.total_steps - self.start_step - self.warmup_steps)
        progress = min(1.0, (s - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                            min_ratio: float = 0.1, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_ratio, start_step))
