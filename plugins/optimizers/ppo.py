"""PPO for RLHF, as in Ziegler et al. (2019) and Huang et al. (2024), "The N+ Implementation
Details of RLHF with PPO": per-token KL penalty, score on the last token, GAE, whitened
advantages, clipped ratio and value losses, several epochs over minibatches (the core's
update loop runs them; this file is the objective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rlhf_plugins.optimizers.detectors import approx_kl_tiny, ratio_skips, trust_region, value_explains_nothing

from rlhf.contracts.interfaces import ROLLOUTS, Rollout
from rlhf.contracts.metrics import (
    APPROX_KL,
    CLIPFRAC,
    ENTROPY,
    EXPLAINED_VAR,
    LOSS_POLICY,
    LOSS_VALUE,
    VALUE_CLIPFRAC,
    VALUE_MEAN,
)
from rlhf.contracts.registry import register
from rlhf.contracts.update import Loss, MinibatchConfig
from rlhf.core.toolkit import numerics
from rlhf.core.toolkit.objectives import KLObjective, KLShapedConfig
from rlhf.core.toolkit.reductions import token_mean


def ppo_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, clip_coef, clip_coef_value,
               weight=None):
    """Clipped surrogate and clipped value loss over the masked tokens. All inputs (b, T); `weight`,
    importance weights of samples drawn by a proposal q != pi_old (decoupled PPO: the ratio is
    against the policy that was current, the weight carries q to it).

    Returns pg_loss, vf_loss, the ratio, the log-ratio, and where the clipped value loss won.
    """
    logratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_losses = torch.max(pg_loss1, pg_loss2)
    pg_loss = token_mean(pg_losses if weight is None else pg_losses * weight, mask)

    vpred_clipped = old_values + torch.clamp(vpred - old_values, -clip_coef_value, clip_coef_value)
    vf_loss1 = (vpred - returns) ** 2
    vf_loss2 = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * token_mean(torch.max(vf_loss1, vf_loss2), mask)
    return pg_loss, vf_loss, ratio, logratio, vf_loss2 > vf_loss1


@register("optimizer", "ppo")
class PPO(KLObjective):
    @dataclass
    class Config(KLShapedConfig, MinibatchConfig):
        lr: float = 3e-4  # Adam learning rate for adapters and value head
        adam_eps: float = 1e-5  # Adam's epsilon (the N+ implementation details)
        epochs: int = 4  # passes over each rollout batch
        num_minibatches: int = 4  # minibatches per pass
        clip_coef: float = 0.2  # policy ratio clipping epsilon
        clip_coef_value: float = 0.2  # value prediction clipping around the rollout values
        vf_coef: float = 0.1  # weight of the value loss
        ratio_threshold: float = 10.0  # skip a minibatch whose mean ratio pi / pi_old exceeds this (counted)

        def inert(self) -> dict[str, str]:  # a batch stepped on once: the ratio is 1, the values are the old ones
            reuse = "epochs or num_minibatches > 1"
            return {**super().inert(), **({} if self.reused() else dict.fromkeys(
                ("clip_coef", "clip_coef_value", "ratio_threshold"), reuse))}

    needs_value_head = True
    consumes = ROLLOUTS
    detectors = (trust_region, ratio_skips, value_explains_nothing)  # over the metrics only it logs
    tiny_steps = staticmethod(approx_kl_tiny)  # its evidence of tiny updates

    def __init__(self, cfg: Config):
        cfg.check("ppo", clip_coef=(cfg.clip_coef > 0, "> 0"), clip_coef_value=(cfg.clip_coef_value > 0, "> 0"),
                  ratio_threshold=(cfg.ratio_threshold > 1, "> 1"))
        super().__init__(cfg)

    def prepare(self, r: Rollout) -> dict[str, torch.Tensor]:
        kl, advantages, returns = self.shaping(r)  # (B, T) each
        return {"kl": kl, "advantages": advantages, "returns": returns}

    def loss(self, policy, mb: Rollout, t: dict[str, torch.Tensor], epoch: int) -> Loss:
        c, m = self.cfg, mb.mask  # (b, T_mb)
        # the entropy is a full-vocabulary pass: once per batch, on the policy that sampled it
        new_logprobs, vpred, entropy = policy.token_logprobs(mb.input_ids, mb.attention_mask, mb.query_len,
                                                             mb.temperature, with_entropy=epoch == 0)
        pg_loss, vf_loss, ratio, logratio, vf_clipped = ppo_losses(
            new_logprobs, mb.logprobs, t["advantages"], vpred, mb.values, t["returns"], m, c.clip_coef, c.clip_coef_value,
            mb.is_weight)
        loss = pg_loss + c.vf_coef * vf_loss
        with torch.no_grad():
            stats = {
                LOSS_POLICY: pg_loss,
                LOSS_VALUE: vf_loss,
                APPROX_KL: numerics.masked_mean((ratio - 1) - logratio, m),
                CLIPFRAC: numerics.masked_mean(((ratio - 1).abs() > c.clip_coef).float(), m),
                VALUE_CLIPFRAC: numerics.masked_mean(vf_clipped.float(), m),
            }
            if entropy is not None:
                stats[ENTROPY] = numerics.masked_mean(entropy, m)
            too_far = bool(numerics.masked_mean(ratio.detach(), m) > c.ratio_threshold)
        return Loss(loss, stats, skip=too_far)

    def finish(self, r: Rollout, t: dict[str, torch.Tensor]) -> dict[str, float]:
        return {**self.shaping.after_update(t["kl"], r),
                EXPLAINED_VAR: numerics.explained_variance(r.values, t["returns"], r.mask).item(),
                VALUE_MEAN: numerics.masked_mean(r.values, r.mask).item()}
