"""GRPO (Shao et al. 2024): G samples per prompt, advantages normalised within the group,
A_i = (R_i - mean_G R) / (std_G R + eps), a PPO-style clipped surrogate averaged over each
response's tokens, no value function.

kl_penalty: "reward" (default) puts -beta * sum_t KL_t (kl_estimator per token) into R,
whose fixed point is the KL-regularised optimum pi*: there every R is the same, beta log Z.
"loss" is the paper's form: R is the score alone and beta * KL_t (kl_estimator) is added to
each token's loss. With k3 (the paper's choice) its expected gradient is that of
KL(pi_ref || pi), the forward KL, so it converges elsewhere (README); k1 in the loss has an
expected gradient of zero (E_pi[grad log pi] = 0), so it is refused.

loss_aggregation: "response_mean" (the paper) takes the mean over each response's tokens,
so a response's gradient is weighed by 1/length; "sum" (Dr. GRPO, Liu et al. 2025) sums
over them. The README's conformance table measures where each lands on whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rlhf_plugins.optimizers.detectors import trust_region

from rlhf.contracts.interfaces import ROLLOUTS, Rollout
from rlhf.contracts.metrics import CLIPFRAC, LOSS_POLICY, RETURN
from rlhf.contracts.registry import register
from rlhf.contracts.update import Loss, MinibatchConfig
from rlhf.core.toolkit import numerics
from rlhf.core.toolkit.objectives import KLConfig, KLObjective
from rlhf.core.toolkit.reductions import row_mean


def group_advantages(returns: torch.Tensor, group_size: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """(R_i - mean_G R) / (std_G R + eps) within each prompt's group. (B,) -> (B,)"""
    grouped = returns.view(-1, group_size)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(1, keepdim=True) + eps)
    return advantages.flatten()


@register("optimizer", "grpo")
class GRPO(KLObjective):
    @dataclass
    class Config(KLConfig, MinibatchConfig):
        group_size: int = 4  # samples per prompt (train.batch_size counts prompts)
        kl_penalty: str = "reward"  # reward: -beta KL in the return (exact optimum); loss: beta k3 in the loss (paper)
        clip_coef: float = 0.2  # ratio clipping epsilon
        scale_rewards: bool = True  # divide by the group's std (Dr. GRPO, Liu et al. 2025, argues against)
        loss_aggregation: str = "response_mean"  # response_mean: each response's token mean (paper); sum: token sum (Dr. GRPO)

        def inert(self) -> dict[str, str]:  # a batch stepped on once: the ratio is 1, nothing to clip
            return {**super().inert(), **({} if self.reused() else {"clip_coef": "epochs or num_minibatches > 1"})}

    consumes = ROLLOUTS
    detectors = (trust_region,)  # its clipfrac

    def __init__(self, cfg: Config):
        cfg.check("grpo", group_size=(cfg.group_size >= 2, "at least 2"),
                  kl_penalty=(cfg.kl_penalty in ("reward", "loss"), "reward or loss"),
                  kl_estimator=(cfg.kl_penalty == "reward" or cfg.kl_estimator != "k1",
                                "k3 with kl_penalty=loss: k1 in the loss has an expected gradient of zero"),
                  loss_aggregation=(cfg.loss_aggregation in ("response_mean", "sum"), "response_mean or sum"),
                  clip_coef=(cfg.clip_coef > 0, "> 0"))
        super().__init__(cfg)
        self.samples_per_prompt = cfg.group_size

    def prepare(self, r: Rollout) -> dict[str, torch.Tensor]:
        c = self.cfg
        if c.kl_penalty == "reward":
            kl, returns = self.shaping.sequence_returns(r)  # R = score - beta * sum_t KL_t
        else:  # the KL goes into the loss below; R is the score alone
            kl, returns = self.shaping.kl(r), r.scores
        return {"kl": kl, "returns": returns, "advantages": group_advantages(returns, c.group_size, c.scale_rewards)}

    def loss(self, policy, mb: Rollout, t: dict[str, torch.Tensor], epoch: int) -> Loss:
        c, m = self.cfg, mb.mask  # (b, T_mb)
        logprobs, _, _ = policy.token_logprobs(mb.input_ids, mb.attention_mask, mb.query_len, mb.temperature,
                                               with_values=False)
        ratio = torch.exp((logprobs - mb.logprobs) * m)
        adv = t["advantages"][:, None]  # (b, 1): one advantage for every token of a response
        pg_loss1 = -adv * ratio
        pg_loss2 = -adv * torch.clamp(ratio, 1 - c.clip_coef, 1 + c.clip_coef)
        per_token = torch.max(pg_loss1, pg_loss2)
        if c.kl_penalty == "loss":  # the paper's k3 = pi_ref / pi - 1 - log(pi_ref / pi)
            per_token = per_token + c.beta * numerics.kl_per_token(logprobs, mb.ref_logprobs, c.kl_estimator)
        if mb.is_weight is not None:  # samples of a proposal q != pi, weighted to pi
            per_token = per_token * mb.is_weight
        if c.loss_aggregation == "response_mean":  # mean over each response, then over responses
            loss = row_mean(numerics.masked_mean(per_token, m, dim=1))
        else:  # sum over each response's tokens: a long response counts as much per token as a short one
            loss = row_mean((per_token * m).sum(1))
        with torch.no_grad():
            stats = {LOSS_POLICY: loss, CLIPFRAC: numerics.masked_mean(((ratio - 1).abs() > c.clip_coef).float(), m)}
        return Loss(loss, stats)

    def finish(self, r: Rollout, t: dict[str, torch.Tensor]) -> dict[str, float]:
        return {RETURN: t["returns"].mean().item(), **self.shaping.after_update(t["kl"], r)}
