"""Plugins that fail on purpose, for the robustness tests (loaded with RLHF_PLUGINS, or
imported by a test after collection, so the contract suite never sees them).

- `reward=faulty`: a cheap reward that, from its `at_call`-th score() call on, returns a
  NaN, raises, or calls sys.exit(1) (`once`: at that call only).
- CRASH_IN_CHECKPOINT=N in the environment: the N-th checkpoint write dies half-way
  through its state file, with os._exit, as a kill -9 would leave it.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass

import torch

from rlhf.contracts.registry import register


@register("reward", "faulty")
class FaultyReward:
    @dataclass
    class Config:
        fail: str = "none"  # none, nan, inf, raise or exit
        at_call: int = 1  # the score() call (1 = the first, evaluation included) from which it fails
        once: bool = False  # fail at that call only

    def __init__(self, cfg: Config):
        self.cfg, self.calls = cfg, 0

    def score(self, queries, responses):
        self.calls += 1
        out = torch.tensor([(len(r.split()) % 3) / 2 for r in responses], dtype=torch.float32)
        if self.calls == self.cfg.at_call or (self.calls > self.cfg.at_call and not self.cfg.once):
            if self.cfg.fail in ("nan", "inf"):
                out[len(out) // 2] = float(self.cfg.fail)
            elif self.cfg.fail == "raise":
                raise RuntimeError("faulty reward: failing on purpose")
            elif self.cfg.fail == "exit":
                sys.exit(1)
        return out


if os.environ.get("CRASH_IN_CHECKPOINT"):
    _n, _calls, _real_save = int(os.environ["CRASH_IN_CHECKPOINT"]), [0], torch.save

    def _dying_save(obj, f, *args, **kwargs):
        _calls[0] += 1
        if _calls[0] < _n:
            return _real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        _real_save(obj, buf, *args, **kwargs)
        with open(f, "wb") as out:  # half the file, then the process is gone
            out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        os._exit(137)

    torch.save = _dying_save
