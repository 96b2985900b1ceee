"""Advantage actor-critic: PPO's rollouts, KL-shaped rewards and value head, but one
gradient step per batch on the plain policy gradient, with no ratio and no clipping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rlhf_plugins.optimizers.detectors import value_explains_nothing

from rlhf.contracts.interfaces import Rollout
from rlhf.contracts.registry import register
from rlhf.core.loop.update import Loss, token_mean
from rlhf.core.toolkit import numerics
from rlhf.core.toolkit.objectives import KLObjective, KLShapedConfig


@register("optimizer", "a2c")
class A2C(KLObjective):
    @dataclass
    class Config(KLShapedConfig):
        adam_eps: float = 1e-5  # Adam's epsilon (as PPO's)
        advantage: str = "gae"  # gae (uses gae_lambda) or nstep (uses n_steps)
        n_steps: int = 8  # bootstrap horizon of n-step returns
        vf_coef: float = 0.1  # weight of the value loss
        ent_coef: float = 0.0  # weight of the entropy bonus

        def inert(self) -> dict[str, str]:
            return {**super().inert(), **({"n_steps": "advantage=nstep"} if self.advantage == "gae"
                                          else {"gae_lambda": "advantage=gae"})}

    needs_value_head = True
    consumes = "rollouts"
    samples_per_prompt = 1
    detectors = (value_explains_nothing,)  # over the metrics only it logs

    def __init__(self, cfg: Config):
        cfg.check("a2c", advantage=(cfg.advantage in ("gae", "nstep"), "gae or nstep"),
                  n_steps=(cfg.n_steps >= 1, "at least 1"))
        super().__init__(cfg)

    def prepare(self, r: Rollout) -> dict[str, torch.Tensor]:
        c = self.cfg
        kl, advantages, returns = self.shaping(r, n_step=c.n_steps if c.advantage == "nstep" else None)  # (B, T) each
        return {"kl": kl, "advantages": advantages, "returns": returns}

    def loss(self, policy, r: Rollout, t: dict[str, torch.Tensor], epoch: int) -> Loss:
        c, mask = self.cfg, r.mask
        logprobs, vpred, entropy = policy.token_logprobs(r.input_ids, r.attention_mask, r.query_len, policy.temperature,
                                                         with_entropy=True)  # (B, T) each
        entropy = token_mean(entropy, mask)
        pg = t["advantages"] * logprobs
        pg_loss = -token_mean(pg if "is_weight" not in t else pg * t["is_weight"], mask)  # (weighted: samples of q != pi)
        vf_loss = 0.5 * token_mean((vpred - t["returns"]) ** 2, mask)
        loss = pg_loss + c.vf_coef * vf_loss - c.ent_coef * entropy
        return Loss(loss, {"loss/policy": pg_loss, "loss/value": vf_loss, "policy/entropy": entropy})

    def finish(self, r: Rollout, t: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"val/explained_var": numerics.explained_variance(r.values, t["returns"], r.mask).item(),
                "val/mean": numerics.masked_mean(r.values, r.mask).item(),
                **self.shaping.after_update(t["kl"], r)}
