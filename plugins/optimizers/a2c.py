"""Advantage actor-critic: PPO's rollouts, KL-shaped rewards and value head, but one
gradient step per batch on the plain policy gradient, with no ratio and no clipping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rlhf_plugins.optimizers.detectors import value_explains_nothing

from rlhf.contracts.interfaces import ROLLOUTS, Rollout
from rlhf.contracts.metrics import ENTROPY, EXPLAINED_VAR, LOSS_POLICY, LOSS_VALUE, VALUE_MEAN
from rlhf.contracts.registry import register
from rlhf.contracts.update import Loss
from rlhf.core.toolkit import numerics
from rlhf.core.toolkit.objectives import KLObjective, KLShapedConfig
from rlhf.core.toolkit.reductions import token_mean


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
    consumes = ROLLOUTS
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
        logprobs, vpred, entropy = policy.token_logprobs(r.input_ids, r.attention_mask, r.query_len, r.temperature,
                                                         with_entropy=True)  # (B, T) each
        entropy = token_mean(entropy, mask)
        pg = t["advantages"] * logprobs
        pg_loss = -token_mean(pg if r.is_weight is None else pg * r.is_weight, mask)  # (weighted: samples of q != pi)
        vf_loss = 0.5 * token_mean((vpred - t["returns"]) ** 2, mask)
        loss = pg_loss + c.vf_coef * vf_loss - c.ent_coef * entropy
        return Loss(loss, {LOSS_POLICY: pg_loss, LOSS_VALUE: vf_loss, ENTROPY: entropy})

    def finish(self, r: Rollout, t: dict[str, torch.Tensor]) -> dict[str, float]:
        return {EXPLAINED_VAR: numerics.explained_variance(r.values, t["returns"], r.mask).item(),
                VALUE_MEAN: numerics.masked_mean(r.values, r.mask).item(),
                **self.shaping.after_update(t["kl"], r)}
