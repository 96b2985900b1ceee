"""A reward that scores every response the same: a third-party plugin for the tests."""

from dataclasses import dataclass

import torch

from rlhf.contracts.registry import register


@register("reward", "constant")
class ConstantReward:
    @dataclass
    class Config:
        value: float = 0.5  # the score every response gets

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def score(self, queries, responses):
        return torch.full((len(responses),), self.cfg.value)
