"""Advantage actor-critic: PPO's rollouts, KL-shaped rewards and value head, but one
gradient step per batch on the plain policy gradient, with no ratio and no clipping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.contracts.interfaces import Rollout
from rlhf.contracts.registry import register
from rlhf.core import distributed, numerics
from rlhf.core.onpolicy import KLShapedAdvantages, KLShapedConfig
from rlhf.core.optim import adam, gradient_step


@register("optimizer", "a2c")
class A2C:
    @dataclass
    class Config(KLShapedConfig):
        lr: float = 1e-3  # Adam learning rate for adapters and value head
        advantage: str = "gae"  # gae (uses gae_lambda) or nstep (uses n_steps)
        n_steps: int = 8  # bootstrap horizon of n-step returns
        vf_coef: float = 0.1  # weight of the value loss
        ent_coef: float = 0.0  # weight of the entropy bonus
        max_grad_norm: float = 1.0  # gradient-norm clipping; <= 0 turns it off

    needs_value_head = True
    consumes = "rollouts"
    samples_per_prompt = 1

    def __init__(self, cfg: Config):
        cfg.check("a2c", lr=(cfg.lr > 0, "> 0"), advantage=(cfg.advantage in ("gae", "nstep"), "gae or nstep"),
                  n_steps=(cfg.n_steps >= 1, "at least 1"))
        self.cfg = cfg
        self.beta = cfg.beta  # the objective's KL coefficient, as configured (eval.kl_to_optimum)
        self.shaping = KLShapedAdvantages(cfg)

    def setup(self, policy, temperature: float) -> torch.optim.Optimizer:
        self.policy, self.temperature = policy, temperature
        self.params = list(policy.trainable_parameters())
        self.opt = adam(self.params, lr=self.cfg.lr, eps=1e-5)
        return self.opt

    def state_dict(self) -> dict:  # beyond the torch optimizer's, what a resumed run needs
        return self.shaping.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shaping.load_state_dict(state)

    def update(self, r: Rollout) -> dict[str, float]:
        c, mask = self.cfg, r.mask
        kl, advantages, returns = self.shaping(r, n_step=c.n_steps if c.advantage == "nstep" else None)

        self.policy.train()
        logprobs, vpred, entropy = self.policy.token_logprobs(r.input_ids, r.attention_mask, r.query_len,
                                                              self.temperature, with_entropy=True)  # (B, T) each
        # token means over the whole batch, every data-parallel rank's rows included
        entropy = distributed.loss_mean(entropy, mask)
        pg_loss = -distributed.loss_mean(advantages * logprobs, mask)
        vf_loss = 0.5 * distributed.loss_mean((vpred - returns) ** 2, mask)
        loss = pg_loss + c.vf_coef * vf_loss - c.ent_coef * entropy

        grad_norm = gradient_step(self.opt, self.params, loss, c.max_grad_norm)

        return {
            "loss/policy": pg_loss.item(),
            "loss/value": vf_loss.item(),
            "policy/entropy": entropy.item(),
            "optim/grad_norm": grad_norm.item(),
            "val/explained_var": numerics.explained_variance(r.values, returns, mask).item(),
            "val/mean": numerics.masked_mean(r.values, mask).item(),
            **self.shaping.after_update(kl, r),
        }
