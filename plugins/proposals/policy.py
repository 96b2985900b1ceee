"""The default proposal: the current policy itself, through the core's sampling loop. Its log q
is log pi, read off the very logits it sampled from: nothing to correct, and a run is what it
was before proposals existed, bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.contracts.interfaces import Sampling
from rlhf.contracts.registry import register
from rlhf.core.toolkit.sampling import generate


@register("proposal", "policy")
class CurrentPolicy:
    @dataclass
    class Config:
        pass

    is_policy = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def sample(self, policy, queries, s: Sampling, with_values, rows):
        return generate(policy, queries, s.generation_kwargs(), s.temperature, with_values, rows)

    def after_update(self, policy) -> None:
        pass
