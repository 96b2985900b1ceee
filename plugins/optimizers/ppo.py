"""PPO for RLHF, as in Ziegler et al. (2019) and Huang et al. (2024), "The N+ Implementation
Details of RLHF with PPO": per-token KL penalty, score on the last token, GAE, whitened
advantages, clipped ratio and value losses, several epochs over minibatches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.contracts.interfaces import Rollout
from rlhf.contracts.registry import register
from rlhf.core import distributed, numerics, rollout
from rlhf.core.onpolicy import KLShapedAdvantages, KLShapedConfig
from rlhf.core.optim import adam, gradient_step


def ppo_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, clip_coef, clip_coef_value):
    """Clipped surrogate and clipped value loss over the masked tokens. All inputs (b, T).

    Returns pg_loss, vf_loss, the ratio, the log-ratio, and where the clipped value loss won.
    """
    logratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(logratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = numerics.masked_mean(torch.max(pg_loss1, pg_loss2), mask)

    vpred_clipped = old_values + torch.clamp(vpred - old_values, -clip_coef_value, clip_coef_value)
    vf_loss1 = (vpred - returns) ** 2
    vf_loss2 = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * numerics.masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    return pg_loss, vf_loss, ratio, logratio, vf_loss2 > vf_loss1


@register("optimizer", "ppo")
class PPO:
    @dataclass
    class Config(KLShapedConfig):
        lr: float = 3e-4  # Adam learning rate for adapters and value head
        clip_coef: float = 0.2  # policy ratio clipping epsilon
        clip_coef_value: float = 0.2  # value prediction clipping around the rollout values
        vf_coef: float = 0.1  # weight of the value loss
        ppo_epochs: int = 4  # passes over each rollout batch
        num_minibatches: int = 4  # minibatches per pass
        max_grad_norm: float = 1.0  # gradient-norm clipping; <= 0 turns it off
        ratio_threshold: float = 10.0  # skip a minibatch whose mean ratio pi / pi_old exceeds this (counted)

    needs_value_head = True
    consumes = "rollouts"
    samples_per_prompt = 1

    def __init__(self, cfg: Config):
        cfg.check(
            "ppo", lr=(cfg.lr > 0, "> 0"), clip_coef=(cfg.clip_coef > 0, "> 0"), clip_coef_value=(cfg.clip_coef_value > 0, "> 0"),
            ppo_epochs=(cfg.ppo_epochs >= 1, "at least 1"), num_minibatches=(cfg.num_minibatches >= 1, "at least 1"),
            ratio_threshold=(cfg.ratio_threshold > 1, "> 1"),
        )
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
        kl, advantages, returns = self.shaping(r)  # (B, T) each

        B = r.input_ids.shape[0]
        stats: dict[str, list[torch.Tensor]] = {}
        skipped = 0
        self.policy.train()
        for epoch in range(c.ppo_epochs):
            for idx in rollout.minibatch_indices(B, c.num_minibatches, mask.device):
                mb, t = rollout.minibatch(r, idx, advantages=advantages, returns=returns)  # (b, T_mb) each
                m = mb.mask
                # the entropy is a full-vocabulary pass: once per batch, on the policy that sampled it
                new_logprobs, vpred, entropy = self.policy.token_logprobs(
                    mb.input_ids, mb.attention_mask, mb.query_len, self.temperature, with_entropy=epoch == 0)
                pg_loss, vf_loss, ratio, logratio, vf_clipped = ppo_losses(
                    new_logprobs, mb.logprobs, t["advantages"], vpred, mb.values, t["returns"], m,
                    c.clip_coef, c.clip_coef_value,
                )
                loss = pg_loss + c.vf_coef * vf_loss
                too_far = bool(numerics.masked_mean(ratio.detach(), m) > c.ratio_threshold)
                if distributed.any_rank(too_far, m.device):  # every data-parallel rank skips together
                    skipped += 1  # far outside the trust region: a step on it would blow up, not learn
                    continue
                grad_norm = gradient_step(self.opt, self.params, loss, c.max_grad_norm)

                with torch.no_grad():
                    for name, value in {
                        "loss/policy": pg_loss,
                        "loss/value": vf_loss,
                        "policy/approx_kl": numerics.masked_mean((ratio - 1) - logratio, m),
                        "policy/clipfrac": numerics.masked_mean(((ratio - 1).abs() > c.clip_coef).float(), m),
                        "val/clipfrac": numerics.masked_mean(vf_clipped.float(), m),
                        "optim/grad_norm": grad_norm,
                    }.items():
                        stats.setdefault(name, []).append(value.detach())  # tensors: no device sync per minibatch
                    if entropy is not None:
                        stats.setdefault("policy/entropy", []).append(numerics.masked_mean(entropy, m))

        out = numerics.means(stats)
        out["policy/skipped_minibatches"] = skipped
        out.update(self.shaping.after_update(kl, r))
        out["val/explained_var"] = numerics.explained_variance(r.values, returns, mask).item()
        out["val/mean"] = numerics.masked_mean(r.values, mask).item()
        return out
