"""An exploring proposal: the current policy drawn from at another temperature, truncated to its
top-k or top-p, and/or mixed with uniform tokens, q = (1 - eps) pi_T' + eps / V per token.
Every drawn token's log q is exact (the filtered, mixed distribution it came from), so an
optimizer's importance correction (`optimizer.correction=sequence`) keeps pi* as the fixed
point while the samples reach responses pi seldom draws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlhf.contracts.checks import require
from rlhf.contracts.interfaces import Sampling
from rlhf.contracts.registry import register
from rlhf.core.toolkit.sampling import generate


@register("proposal", "explore")
class Explore:
    @dataclass
    class Config:
        temperature: Optional[float] = None  # the proposal's temperature; null: the sampler's
        mix_uniform: float = 0.0  # eps: the share of each token drawn uniformly from the vocabulary
        top_k: int = 0  # > 0: the proposal draws from the top k tokens only (exact truncated log q)
        top_p: float = 1.0  # < 1: from the nucleus only (exact truncated log q)

    is_policy = False

    def __init__(self, cfg: Config):
        require("proposal", [
            ("proposal.temperature", cfg.temperature, cfg.temperature is None or cfg.temperature > 0, "> 0 or null"),
            ("proposal.mix_uniform", cfg.mix_uniform, 0 <= cfg.mix_uniform < 1, "in [0, 1)"),
            ("proposal.top_k", cfg.top_k, cfg.top_k >= 0, ">= 0; 0 is off"),
            ("proposal.top_p", cfg.top_p, 0 < cfg.top_p <= 1, "in (0, 1]; 1 is off")])
        self.cfg = cfg

    def settings(self, gen_kwargs: dict) -> dict:
        """The sampler's settings as this proposal draws: its temperature, truncation and mixing."""
        c = self.cfg
        return {**gen_kwargs, "temperature": c.temperature or gen_kwargs.get("temperature", 1.0), "top_k": c.top_k,
                "top_p": c.top_p, "mix_uniform": c.mix_uniform}

    def sample(self, policy, queries, s: Sampling, with_values, rows):
        gen = self.settings(s.generation_kwargs())
        return generate(policy, queries, gen, gen["temperature"], False, rows, exact_q=True)

    def after_update(self, policy) -> None:
        pass
