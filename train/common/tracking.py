"""Metrics: TensorBoard scalars, a JSONL copy (machine-readable, used by tests and plots), and a tqdm bar.

Only the main process writes; the other ranks get a :class:`MetricsWriter` with ``enabled=False`` so call sites need
no ``if is_main`` guards.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from tqdm.auto import tqdm


class MetricsWriter:
    def __init__(self, log_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self._tb = None
        self._jsonl = None
        if enabled:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # imported lazily: pulls in tensorboard

                self._tb = SummaryWriter(log_dir=str(self.log_dir))
            self._jsonl = open(self.log_dir / "metrics.jsonl", "a", buffering=1)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(v) for k, v in values.items()}
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")

    def image(self, tag: str, hwc_uint8: Any, step: int) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, hwc_uint8, global_step=step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_jsonl_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Throughput:
    """Samples per second over the steps since the last :meth:`rate` call (so logging intervals are independent)."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._n = 0

    def update(self, samples: int) -> None:
        self._n += samples

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (evaluation, checkpointing) out of the current interval."""
        self._t0 += seconds

    def rate(self) -> float:
        now = time.perf_counter()
        rate = self._n / max(now - self._t0, 1e-9)
        self._t0, self._n = now, 0
        return rate


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> tqdm:
    # dynamic_ncols keeps the postfix (loss, img/s) readable in narrow terminals; disable on non-main ranks.
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, smoothing=0.1)
