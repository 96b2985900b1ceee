"""RLOO, REINFORCE with the leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024):
k samples per prompt, each sample's baseline the mean return of the other k - 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.contracts.interfaces import ROLLOUTS, Rollout
from rlhf.contracts.metrics import RETURN
from rlhf.contracts.registry import register
from rlhf.contracts.update import Loss
from rlhf.core.toolkit.objectives import KLConfig, KLObjective, sequence_policy_gradient


def leave_one_out_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """R_i - mean of the other k - 1 returns of the same prompt. (B,) -> (B,), B = prompts * k."""
    grouped = returns.view(-1, k)  # the core puts a prompt's samples side by side
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).flatten()


@register("optimizer", "rloo")
class RLOO(KLObjective):
    @dataclass
    class Config(KLConfig):
        k: int = 4  # samples per prompt (train.batch_size counts prompts)

    consumes = ROLLOUTS

    def __init__(self, cfg: Config):
        cfg.check("rloo", k=(cfg.k >= 2, "at least 2"))
        super().__init__(cfg)
        self.samples_per_prompt = cfg.k

    def prepare(self, r: Rollout) -> dict[str, torch.Tensor]:
        kl, returns = self.shaping.sequence_returns(r)  # (B, T), (B,)
        return {"kl": kl, "returns": returns, "advantages": leave_one_out_advantages(returns, self.cfg.k)}

    def loss(self, policy, r: Rollout, t: dict[str, torch.Tensor], epoch: int) -> Loss:
        return sequence_policy_gradient(policy, r, t["advantages"])

    def finish(self, r: Rollout, t: dict[str, torch.Tensor]) -> dict[str, float]:
        return {RETURN: t["returns"].mean().item(), **self.shaping.after_update(t["kl"], r)}
