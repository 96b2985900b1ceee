"""Distribution matching: maximum likelihood towards the closed-form optimum itself.

pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x) is known up to Z. With k samples y_i of a
prompt drawn by q (the policy, or any proposal), the self-normalised weights
    w_i = softmax_i( r_i / beta + log pi_ref(y_i) - log q(y_i) )
estimate pi* on them, and the update is maximum likelihood on the weighted samples,
    loss = -mean over prompts of sum_i (w_i - v_i) log pi(y_i),
whose expectation is the gradient of the forward KL(pi* || pi) (v_i, the same normalisation
of pi / q, is a baseline with expectation zero: 1/k each when q is the policy). Both KLs are
zero exactly at pi*, so the fixed point is the same as PPO's or REINFORCE's; what differs is
the way there. The reverse KL that on-policy RLHF descends pulls mass to the nearest
high-reward mode and barely moves a response the policy gives ~0 probability (its gradient is
proportional to pi(y)); here a rare good sample, once drawn, carries weight pi*(y) / q(y) and is
pulled up at once. With r / beta = R / beta + sum_t (log pi - log pi_ref), the weights are a
softmax of the KL-regularised returns R: all equal at the optimum, where every R = beta log Z.
The samples' log q come with the rollout, so an exploring proposal needs no correction setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.contracts.interfaces import ROLLOUTS, Rollout
from rlhf.contracts.metrics import RETURN
from rlhf.contracts.registry import register
from rlhf.contracts.update import Loss
from rlhf.core.toolkit.objectives import KLConfig, KLObjective, sequence_policy_gradient


def matching_advantages(log_target: torch.Tensor, log_ratio: torch.Tensor, k: int) -> torch.Tensor:
    """k (w_i - v_i) within each prompt's group: w = softmax(log_target), v = softmax(log_ratio),
    the self-normalised weights of pi* and of pi on q's samples. (B,), (B,) -> (B,), B = prompts * k"""
    w = torch.softmax(log_target.view(-1, k), 1)
    v = torch.softmax(log_ratio.view(-1, k), 1)
    return (k * (w - v)).flatten()


@register("optimizer", "dm")
class DistributionMatching(KLObjective):
    @dataclass
    class Config(KLConfig):
        k: int = 8  # samples per prompt (train.batch_size counts prompts): the weights are normalised among them


    consumes = ROLLOUTS
    takes_importance_weights = False  # its weights divide by log q already: exact for any proposal

    def __init__(self, cfg: Config):
        cfg.check("dm", k=(cfg.k >= 2, "at least 2"), beta=(cfg.beta > 0, "> 0 (the weights divide by it)"))
        super().__init__(cfg)
        self.samples_per_prompt = cfg.k

    def prepare(self, r: Rollout) -> dict[str, torch.Tensor]:
        c = self.cfg
        kl, returns = self.shaping.sequence_returns(r)  # (B, T), (B,): R = score - beta sum_t KL_t
        log_pi_q = ((r.logprobs - r.sampled_logprobs) * r.mask).sum(1)  # log pi(y) / q(y): 0 when q is the policy
        advantages = matching_advantages(returns / c.beta + log_pi_q, log_pi_q, c.k)
        return {"kl": kl, "returns": returns, "advantages": advantages}

    def loss(self, policy, r: Rollout, t: dict[str, torch.Tensor], epoch: int) -> Loss:
        return sequence_policy_gradient(policy, r, t["advantages"])

    def finish(self, r: Rollout, t: dict[str, torch.Tensor]) -> dict[str, float]:
        return {RETURN: t["returns"].mean().item(), **self.shaping.after_update(t["kl"], r)}
