"""Keep the best checkpoints by a user metric, beside the last N: a pure decision.

Retention keeps the ``keep_last`` newest committed steps; :func:`best_steps` names the steps it
must keep on top of them. No I/O: the trainer carries the metrics in its checkpoints (``extra``
``resilient_train.metrics``) and hands the result to retention.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

__all__ = ["best_steps", "retained"]


def best_steps(metrics: Mapping[int, float], keep: int, mode: str = "min") -> list[int]:
    """The ``keep`` steps with the lowest (``mode="min"``) or highest (``"max"``) metric, best
    first. NaN metrics never count as best; ties go to the newer step. ``keep=0``: none."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be an int >= 0, got {keep!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    finite = [(float(v), int(s)) for s, v in metrics.items() if not math.isnan(float(v))]
    sign = 1.0 if mode == "min" else -1.0
    finite.sort(key=lambda vs: (sign * vs[0], -vs[1]))
    return [s for _, s in finite[:keep]]


def retained(committed: Iterable[int], keep_last: int, protect: Iterable[int] = ()) -> set[int]:
    """Committed steps retention keeps: the ``keep_last`` newest (at least one) plus the
    committed ones among ``protect``."""
    steps = sorted(set(committed))
    keep = set(steps[-max(1, keep_last):])
    return keep | (set(protect) & set(steps))
