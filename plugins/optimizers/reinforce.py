"""REINFORCE (Williams 1992): the plain log-derivative policy gradient with a baseline,
grad = E[(R - b) grad log pi(y|x)], R = score - beta * sum_t KL_t, one step per batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.contracts.interfaces import ROLLOUTS, Rollout
from rlhf.contracts.metrics import BASELINE, RETURN
from rlhf.contracts.registry import register
from rlhf.contracts.update import Loss
from rlhf.core.toolkit import models, numerics
from rlhf.core.toolkit.objectives import KLConfig, KLObjective, sequence_policy_gradient


@register("optimizer", "reinforce")
class Reinforce(KLObjective):
    @dataclass
    class Config(KLConfig):
        baseline: str = "ema"  # ema: moving average of past returns (unbiased); batch: this batch's mean; none
        baseline_decay: float = 0.9  # weight of the old value in the moving average

        def inert(self) -> dict[str, str]:
            return {**super().inert(), **({"baseline_decay": "baseline=ema"} if self.baseline != "ema" else {})}

    consumes = ROLLOUTS

    def __init__(self, cfg: Config):
        cfg.check("reinforce", baseline=(cfg.baseline in ("ema", "batch", "none"), "ema, batch or none"),
                  baseline_decay=(0 <= cfg.baseline_decay < 1, "in [0, 1)"))
        super().__init__(cfg)
        self.ema: float | None = None

    def state_dict(self) -> dict:  # beyond the torch optimizer's, what a resumed run needs
        return {**self.shaping.state_dict(), "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.shaping.load_state_dict(state)
        self.ema = state["ema"]

    def prepare(self, r: Rollout) -> dict[str, torch.Tensor]:
        c = self.cfg
        kl, returns = self.shaping.sequence_returns(r)  # (B, T), (B,)
        mean = numerics.batch_mean(returns, reduce=models.all_sum)  # over every rank's rows
        if c.baseline == "batch":
            b = mean
        elif c.baseline == "ema":  # the baseline of past batches only: unbiased
            b = torch.tensor(self.ema if self.ema is not None else 0.0)
            mean = mean.item()
            self.ema = mean if self.ema is None else c.baseline_decay * self.ema + (1 - c.baseline_decay) * mean
        else:
            b = torch.tensor(0.0)
        return {"kl": kl, "advantages": returns - b, "baseline": b, "return": mean}  # (the last two: for the metrics)

    def loss(self, policy, r: Rollout, t: dict[str, torch.Tensor], epoch: int) -> Loss:
        return sequence_policy_gradient(policy, r, t["advantages"])

    def finish(self, r: Rollout, t: dict[str, torch.Tensor]) -> dict[str, float]:
        return {BASELINE: float(t["baseline"]), RETURN: float(t["return"]),
                **self.shaping.after_update(t["kl"], r)}
