"""A reward table r(x, y) given in config: the toy problem whose optimum is known exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence

import torch

from rlhf.contracts.registry import register


def _default_table() -> Dict[str, Dict[str, float]]:
    return {
        "x0": {"y0": 1.0, "y1": 0.5, "y2": 0.0, "y3": -0.5, "y4": -1.0, "y5": 0.25},
        "x1": {"y0": -1.0, "y1": 0.0, "y2": 1.0, "y3": 0.5, "y4": 0.0, "y5": -0.5},
    }


@register("reward", "table")
class TableReward:
    @dataclass
    class Config:
        table: Dict[str, Dict[str, float]] = field(default_factory=_default_table)  # r[prompt][response]
        default: float = -1.0  # reward of a response not in the prompt's row (another token)

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def score(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out = []
        for q, r in zip(queries, responses):
            row = self.cfg.table.get(q.strip())
            if row is None:
                raise ValueError(f"reward=table: prompt {q.strip()!r} has no row in reward.table ({sorted(self.cfg.table)})")
            out.append(row.get(r.strip(), self.cfg.default))
        return torch.tensor(out, dtype=torch.float32)
