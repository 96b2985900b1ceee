"""Where a step's time goes: each phase is timed where it runs and summed per step.

    sampling     drawing the responses (the core's loop, transformers' generate or an engine)
    environment  an episode's environment answering the turns
    behaviour    the policy's own forward pass for log pi (and the values) when sampling did not give them
    reference    the reference's forward pass (log pi_ref)
    scoring      decoding and the reward source
    update       the optimizer's update: its epochs, minibatches and gradient steps
    sync         a proposal learning of the update (an engine's weights pushed into it)
    evaluation   the held-out evaluation (and the exact optimum)
    checkpoint   writing a checkpoint (shown in the next step's row)

`time/<phase>_s` in a step's row of metrics.jsonl, `time/step_s` the whole step; summary.json
has each phase's total and share (`time_<phase>_s`, `time_<phase>_share`). On a GPU each
phase waits for the device before it is read, so the seconds are the phase's own.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

PHASES = ("sampling", "environment", "behaviour", "reference", "scoring", "update", "sync", "evaluation", "checkpoint")


class Clock:
    """Seconds by phase: since the last `take` (a step's) and over the run."""

    def __init__(self) -> None:
        self.step: dict[str, float] = {}
        self.total: dict[str, float] = {}
        self.depth = 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.depth:  # (a phase inside another is the outer one's time)
            yield
            return
        self.depth += 1
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _wait_for_device()
            dt = time.perf_counter() - t0
            self.depth -= 1
            self.step[name] = self.step.get(name, 0.0) + dt
            self.total[name] = self.total.get(name, 0.0) + dt

    def take(self) -> dict[str, float]:
        """The phases since the last take, as metrics (`time/<phase>_s`)."""
        out = {f"time/{name}_s": v for name, v in self.step.items()}
        self.step = {}
        return out

    def summary(self, wall: float) -> dict[str, float]:
        """Each phase's total seconds and its share of `wall`."""
        out = {}
        for name in PHASES:
            if name in self.total:
                out[f"time_{name}_s"] = round(self.total[name], 3)
                out[f"time_{name}_share"] = round(self.total[name] / wall, 4) if wall > 0 else 0.0
        return out

    def reset(self) -> None:
        self.step, self.total = {}, {}


def _wait_for_device() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


CLOCK = Clock()  # one per process: the run's


def phase(name: str):
    """`with phase("sampling"): ...`: the block's seconds count to that phase."""
    return CLOCK.phase(name)
