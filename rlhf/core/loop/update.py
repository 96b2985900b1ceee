"""The one update loop every optimizer shares.

An optimizer plugin states its objective and nothing else: what it prepares from a batch
once (advantages, returns; no gradients), the loss of a batch or a minibatch with one
named tensor per term of its paper's equation, and what it reports after the update. The
core runs the rest, the same for every plugin:

    batch.is_weight = importance weights              # samples of q != pi (optimizer.correction)
    prepared = objective.prepare(batch)               # no gradients
    for epoch in range(epochs):                       # the settings its config declares (cfg.update()):
        for mb, t in minibatches(batch, prepared):    #   epochs over minibatches (PPO, GRPO), or the
            out = objective.loss(policy, mb, t, epoch)#   whole batch once
            if out.skip on any rank: skip it, counted # (PPO's ratio guard) every rank together
            zero_grad, backward, clip, Adam step      # rlhf.core.loop.optim.gradient_step
    metrics = the means of the steps' stats, then objective.finish(batch, prepared)

A loss is reduced by the one rule of `rlhf.core.toolkit.reductions` (token_mean, row_mean).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rlhf.contracts import metrics
from rlhf.contracts.interfaces import PolicyOptimizer
from rlhf.core.loop.optim import adam, gradient_step
from rlhf.core.loop.phases import phase
from rlhf.core.parallel import distributed
from rlhf.core.rollout import collect
from rlhf.core.toolkit import numerics


def step(objective: PolicyOptimizer, policy: Any, opt: torch.optim.Optimizer, params: list, batch: Any) -> dict[str, float]:
    """One update of `objective` on `batch` (module doc); returns its metrics."""
    with phase("update"):
        return _step(objective, policy, opt, params, batch)


def _step(objective: PolicyOptimizer, policy: Any, opt: torch.optim.Optimizer, params: list, batch: Any) -> dict[str, float]:
    s = objective.cfg.update()
    if (objective.takes_importance_weights and s.correction != "none"
            and getattr(batch, "proposal_logprobs", None) is not None):  # a rollout drawn by q != pi
        batch = dataclasses.replace(batch, is_weight=numerics.importance_weights(
            batch.logprobs, batch.proposal_logprobs, batch.mask, s.correction, s.is_cap))
    prepared = objective.prepare(batch)
    cut = s.num_minibatches is not None
    policy.train()
    stats: dict[str, list[torch.Tensor]] = {}
    skipped = 0
    for epoch in range(s.epochs):
        parts = ([collect.minibatch(batch, idx, **prepared)
                  for idx in collect.minibatch_indices(batch.input_ids.shape[0], s.num_minibatches, batch.mask.device)]
                 if cut else [(batch, prepared)])
        for mb, t in parts:
            out = objective.loss(policy, mb, t, epoch)
            if out.skip is not None and distributed.any_rank(bool(out.skip), mb.mask.device):
                skipped += 1  # far outside the trust region: a step on it would blow up, not learn
                continue
            grad_norm = gradient_step(opt, params, out.loss, s.max_grad_norm)
            for name, value in {**out.stats, metrics.GRAD_NORM: grad_norm}.items():
                stats.setdefault(name, []).append(value.detach())  # tensors: no device sync per minibatch
    out_metrics = numerics.means(stats)
    if cut:
        out_metrics[metrics.SKIPPED_MINIBATCHES] = skipped
    out_metrics.update(objective.finish(batch, prepared))
    return out_metrics


class Updater:
    """An objective bound to the policy it trains: the trained parameters, Adam over them (the
    plugin's lr and adam_eps), and `step(batch)`."""

    def __init__(self, objective: PolicyOptimizer, policy: Any):
        self.objective, self.policy = objective, policy
        self.params = list(policy.trainable_parameters())
        settings = objective.cfg.update()
        self.opt = adam(self.params, lr=settings.lr, eps=settings.adam_eps)

    def step(self, batch: Any) -> dict[str, float]:
        return step(self.objective, self.policy, self.opt, self.params, batch)
