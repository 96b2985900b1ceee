"""A family of hard toy problems, one per seed: for each prompt the optimum's best response is
one the reference almost never produces.

For the toy policy `model` (the sequence toys' tiny GPT-2) every response up to the cap is
enumerated with its reference probability, as rlhf.core.evaluation.optimum does. Per prompt, seeded by
(seed, prompt): every response gets a small random reward (std `noise`); a likely response
(pi_ref >= 0.02) gets `decoy` more, a local mode to climb first; and a response the reference
gives between `best_above` and `best_below` (two tokens or more) gets the reward that makes
pi*(best | x) = `target` at `beta`: with M the sum of pi_ref(y) exp(r(y) / beta) over the
other responses, r(best) = beta log(target M / ((1 - target) pi_ref(best))). The table is
built on the first score(), from the model alone (no gradients, a few hundred responses).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register


@register("reward", "hard")
class HardToy:
    @dataclass
    class Config:
        seed: int = 0  # which toy of the family
        model: str = "toy:3x4:eos"  # the reference the toy is hard for (policy.path of the sequence toys)
        max_new_tokens: int = 3  # the response cap (the sampler's)
        best_below: float = 1e-3  # pi_ref of the best response at most this ...
        best_above: float = 1e-4  # ... and at least this (a sample can reach it)
        target: float = 0.75  # pi*(best | x) at `beta`
        beta: float = 0.5  # the KL coefficient the target is set for
        decoy: float = 1.0  # the extra reward of a likely response: a local mode
        noise: float = 0.1  # std of every response's small random reward

    def __init__(self, cfg: Config):
        require("hard", [("reward.target", cfg.target, 0 < cfg.target < 1, "in (0, 1)"),
                         ("reward.beta", cfg.beta, cfg.beta > 0, "> 0"),
                         ("reward.best_below", cfg.best_below, 0 < cfg.best_above < cfg.best_below < 1,
                          f"in (reward.best_above={cfg.best_above}, 1)")])
        self.cfg = cfg
        self.table: dict[str, dict[str, float]] = {}
        self.best: dict[str, tuple[str, float]] = {}  # per prompt: the best response and its pi_ref
        self._policy = None

    def score(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.row(q.strip()).get(r.strip(), 0.0) for q, r in zip(queries, responses)])

    def row(self, prompt: str) -> dict[str, float]:
        if prompt not in self.table:
            self.table[prompt] = self._build(prompt)
        return self.table[prompt]

    def _build(self, prompt: str) -> dict[str, float]:
        from rlhf.core.toolkit.optimum import response_distribution

        c, policy = self.cfg, self._reference()
        ids = policy.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        zero = _Zero()
        d = response_distribution(policy, zero, ids, 1.0, {"max_new_tokens": c.max_new_tokens}, 1.0)
        p = d.log_ref.exp().tolist()
        rng = random.Random(f"hard-{c.seed}-{prompt}")
        r = [rng.gauss(0.0, c.noise) for _ in d.texts]
        likely = [i for i, x in enumerate(p) if x >= 0.02 and d.texts[i]]
        rare = [i for i, x in enumerate(p) if c.best_above <= x <= c.best_below and len(d.responses[i]) >= 2]
        if not likely or not rare:
            raise ValueError(f"reward=hard: prompt {prompt!r} of {c.model} has no response with pi_ref in "
                             f"[{c.best_above}, {c.best_below}] (or none likely); widen reward.best_below/best_above")
        r[rng.choice(likely)] += c.decoy
        best = rng.choice(rare)
        others = sum(p[i] * math.exp(r[i] / c.beta) for i in range(len(p)) if i != best)
        r[best] = c.beta * math.log(c.target * others / ((1 - c.target) * p[best]))
        self.best[prompt] = (d.texts[best], p[best])
        return dict(zip(d.texts, r))

    def _reference(self):
        if self._policy is None:
            from rlhf.contracts.schema import LoraSettings, PolicyConfig
            from rlhf.core.toolkit.models import Policy

            self._policy = Policy.load(PolicyConfig(path=self.cfg.model, lora=LoraSettings(enabled=False)),
                                       torch.device("cpu"))
        return self._policy


class _Zero:
    def score(self, queries, responses):
        return torch.zeros(len(responses))
