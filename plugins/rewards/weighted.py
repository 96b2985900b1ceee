"""A weighted sum of reward sources:
`reward=weighted +reward.weights.verifiable=1.0 +reward.weights.lexicon=0.1`.

Each part is a registered reward plugin built with its own defaults, changed per part
through `reward.settings`: `+reward.settings.verifiable.match=exact` (Hydra adds dict keys
with a leading +). Every part gets the
data's columns it asks for; the sum is sum_i w_i r_i(x, y).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

import torch

from rlhf.contracts.registry import PluginError, register


@register("reward", "weighted")
class WeightedReward:
    @dataclass
    class Config:
        weights: Dict[str, float] = field(default_factory=dict)  # reward plugin name -> weight
        settings: Dict[str, Any] = field(default_factory=dict)  # reward plugin name -> {field: value} for that part

    def __init__(self, cfg: Config):
        from omegaconf import OmegaConf

        from rlhf.contracts import registry

        if not cfg.weights:
            raise PluginError("reward=weighted needs reward.weights, e.g. +reward.weights.verifiable=1.0 "
                              "+reward.weights.lexicon=0.1")
        names = {p.name: p for p in registry.plugins("reward")}
        unknown = sorted(set(cfg.weights) - set(names)) + sorted(set(cfg.settings) - set(cfg.weights))
        if unknown:
            raise PluginError(f"reward.weights / reward.settings name {unknown}, which are not parts: reward plugins are "
                              f"{sorted(n for n in names if n != 'weighted')}, and settings go only to parts in weights")
        if "weighted" in cfg.weights:
            raise PluginError("reward.weights: a weighted reward cannot hold itself")
        self.parts = []
        for name, weight in cfg.weights.items():
            # (the part is its plugin, whatever its settings say)
            node = OmegaConf.create({**dict(cfg.settings.get(name) or {}), "_target_": names[name].target})
            self.parts.append((name, float(weight), registry.instantiate("reward", node)))

    def score(self, queries: Sequence[str], responses: Sequence[str], **columns: Sequence[Any]) -> torch.Tensor:
        from rlhf.core.toolkit.sampling import score

        total = torch.zeros(len(responses))
        for _, weight, part in self.parts:
            total += weight * score(part, list(queries), list(responses), torch.device("cpu"), dict(columns))
        return total
