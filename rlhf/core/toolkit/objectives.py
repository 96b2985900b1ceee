"""What every on-policy optimizer does to a rollout before its own loss: the per-token KL
penalty, the score on the last token, advantages (GAE or n-step), whitening, and the
optional adaptive KL controller. The config fields are shared by inheritance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlhf.contracts.interfaces import Rollout
from rlhf.contracts.metrics import BETA, ENTROPY, KL_PENALTY, LOSS_POLICY
from rlhf.contracts.update import CORRECTIONS, Loss, OptimConfig, UpdateSettings
from rlhf.core.parallel import distributed
from rlhf.core.toolkit import numerics
from rlhf.core.toolkit.reductions import row_mean


@dataclass
class KLConfig(OptimConfig):
    beta: float = 0.05  # KL penalty coefficient (initial value if adaptive_kl)
    kl_estimator: str = "k1"  # per-token KL in the reward: k1 (log ratio) or k3
    adaptive_kl: bool = False  # adapt beta towards kl_target (Ziegler et al. 2019)
    kl_target: float = 6.0  # target sequence KL of the adaptive controller
    kl_horizon: int = 10000  # horizon (in samples) of the adaptive controller
    # samples of a proposal q != pi (proposal=explore, stale, vllm) corrected to pi: none (valid only for q = pi),
    # token_tis (each token's ratio truncated at is_cap), sequence_mis (responses whose weight leaves
    # [1/is_cap, is_cap] masked out), sequence (the exact weight pi(y) / q(y))
    correction: str = "none"
    is_cap: float = 2.0  # token_tis: the cap of a token's ratio; sequence_mis: the band of a response's weight

    def check(self, plugin: str, **checks: tuple[bool, str]) -> None:
        super().check(plugin, **{"beta": (self.beta >= 0, ">= 0"),
                                 "correction": (self.correction in CORRECTIONS, ", ".join(CORRECTIONS)),
                                 "is_cap": (self.is_cap > 1, "> 1"),
                                 "kl_estimator": (self.kl_estimator in ("k1", "k3"), "k1 or k3"),
                                 "kl_target": (self.kl_target > 0, "> 0"), "kl_horizon": (self.kl_horizon > 0, "> 0"), **checks})

    def update(self) -> UpdateSettings:
        return dataclasses.replace(super().update(), correction=self.correction, is_cap=self.is_cap)

    def inert(self) -> dict[str, str]:
        out = super().inert()
        if not self.adaptive_kl:
            out.update(kl_target="adaptive_kl=true", kl_horizon="adaptive_kl=true")
        if self.correction not in ("token_tis", "sequence_mis"):
            out.update(is_cap="correction=token_tis or sequence_mis")
        return out


@dataclass
class KLShapedConfig(KLConfig):
    gamma: float = 1.0  # discount over response tokens
    gae_lambda: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages over the batch

    def check(self, plugin: str, **checks: tuple[bool, str]) -> None:
        super().check(plugin, **{"gamma": (0 <= self.gamma <= 1, "in [0, 1]"),
                                 "gae_lambda": (0 <= self.gae_lambda <= 1, "in [0, 1]"), **checks})


class KLObjective:
    """What every objective with a KL-shaped return starts from: its checked config, the beta of
    its objective as configured (eval.kl_to_optimum), the shaping, and the one piece of state
    a resumed run needs, the adaptive controller's beta."""

    def __init__(self, cfg: KLConfig):
        self.cfg = cfg
        self.beta = cfg.beta
        self.shaping = KLShapedAdvantages(cfg)

    def state_dict(self) -> dict:  # beyond the torch optimizer's, what a resumed run needs
        return self.shaping.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.shaping.load_state_dict(state)


class KLShapedAdvantages:
    def __init__(self, cfg: KLConfig):
        self.cfg = cfg
        self.kl_ctl = numerics.AdaptiveKLController(cfg.beta, cfg.kl_target, cfg.kl_horizon)

    @property
    def beta(self) -> float:
        return self.kl_ctl.beta

    def state_dict(self) -> dict:
        """What a resumed run needs: the adaptive controller's current beta (and the beta it was
        configured with, so that a resume forced to another beta starts from that one)."""
        return {"beta": self.kl_ctl.beta, "beta_configured": self.cfg.beta}

    def load_state_dict(self, state: dict) -> None:
        if state.get("beta_configured", self.cfg.beta) == self.cfg.beta:
            self.kl_ctl.beta = state["beta"]

    @torch.no_grad()
    def __call__(self, r: Rollout, n_step: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-token KL, advantages, returns), all (B, T); GAE unless n_step is given."""
        c = self.cfg
        if r.values is None:
            raise ValueError("advantages need values: the optimizer must set needs_value_head = True")
        kl = numerics.kl_estimate(r.log_ratio, c.kl_estimator)
        rewards = numerics.kl_penalized_rewards(r.scores, kl, r.mask, self.beta, r.token_scores)
        if n_step is None:
            advantages, returns = numerics.over_policy_tokens(numerics.gae, rewards, r.values, r.mask, c.gamma, c.gae_lambda)
        else:
            advantages, returns = numerics.over_policy_tokens(numerics.n_step_advantages, rewards, r.values, r.mask,
                                                              c.gamma, n_step)
        if c.whiten_advantages:
            advantages = numerics.masked_whiten(advantages, r.mask, reduce=distributed.all_sum)  # whole-batch statistics
        return kl, advantages, returns

    @torch.no_grad()
    def kl(self, r: Rollout) -> torch.Tensor:
        """Per-token KL estimate of the sampled tokens (kl_estimator), 0 on padding. (B, T)"""
        return numerics.kl_estimate(r.log_ratio, self.cfg.kl_estimator) * r.mask

    @torch.no_grad()
    def sequence_returns(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token KL (B, T), R (B,) = score - beta * sum_t kl_t), for sequence-level methods."""
        kl = self.kl(r)
        return kl, r.scores - self.beta * kl.sum(1)

    def after_update(self, kl: torch.Tensor, r: Rollout) -> dict[str, float]:
        """Step the adaptive controller; the metrics every on-policy optimizer reports."""
        beta = self.beta
        seq_kl = numerics.batch_mean((kl * r.mask).sum(1), reduce=distributed.all_sum).item()
        if self.cfg.adaptive_kl:
            self.kl_ctl.update(seq_kl, r.input_ids.shape[0] * distributed.world())
        return {BETA: beta, KL_PENALTY: -beta * seq_kl}


def sequence_policy_gradient(policy, r: Rollout, advantages: torch.Tensor) -> Loss:
    """REINFORCE's loss, -mean_i A_i log pi(y_i|x_i) with log pi summed over the response's
    tokens, and the policy's entropy; each token's term weighted by the rollout's importance
    weights (samples of a proposal q != pi, `r.is_weight`). advantages: (B,)"""
    weight = r.is_weight  # (B, T) or None
    logprobs, _, entropy = policy.token_logprobs(r.input_ids, r.attention_mask, r.query_len, r.temperature,
                                                 with_values=False, with_entropy=True)  # (B, T) each
    seq_logprobs = (logprobs * (r.mask if weight is None else r.mask * weight)).sum(1)  # (B,)
    pg_loss = -row_mean(advantages * seq_logprobs)
    with torch.no_grad():
        entropy = numerics.masked_mean(entropy.detach(), r.mask)
    return Loss(pg_loss, {LOSS_POLICY: pg_loss.detach(), ENTROPY: entropy})
