"""The one update loop every optimizer shares.

An optimizer plugin states its objective and nothing else: what it prepares from a batch
once (advantages, returns; no gradients), the loss of a batch or a minibatch with one
named tensor per term of its paper's equation, and what it reports after the update. The
core runs the rest, the same for every plugin:

    prepared = objective.prepare(batch)               # no gradients (+ importance weights, for q != pi)
    for epoch in range(epochs):                       # `epochs` and `num_minibatches`: a plugin
        for mb, t in minibatches(batch, prepared):    #   whose config has them reuses a batch
            out = objective.loss(policy, mb, t, epoch)#   (PPO, GRPO); any other takes it once whole
            if out.skip on any rank: skip it, counted # (PPO's ratio guard) every rank together
            zero_grad, backward, clip, Adam step      # rlhf.core.loop.optim.gradient_step
    metrics = the means of the steps' stats, then objective.finish(batch, prepared)

One reduction rule under data parallelism and sharding: a loss is a token mean over every
rank's tokens (`token_mean`) or a mean over every rank's rows (`row_mean`), each scaled so
that the gradient DDP averages (FSDP reduce-scatters) is the global batch's, however ragged
the responses; with one process each is the plain mean, to the bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.contracts.checks import require
from rlhf.core.loop.optim import adam, gradient_step
from rlhf.core.parallel import distributed
from rlhf.core.rollout import collect
from rlhf.core.toolkit import numerics


@dataclass
class OptimConfig:
    """What every optimizer plugin's config has: the gradient step the core takes."""

    lr: float = 1e-3  # Adam learning rate for the trained weights (adapters, value head)
    adam_eps: float = 1e-8  # Adam's epsilon (PPO and A2C: 1e-5, as in the N+ implementation details)
    max_grad_norm: float = 1.0  # gradient-norm clipping; <= 0 turns it off

    def check(self, plugin: str, **checks: tuple[bool, str]) -> None:
        """Raise one error naming every out-of-range field: these and the plugin's own
        (each `field=(ok, requirement)`); then every field set away from its default that the
        others leave without effect (`inert`): a setting a run accepts is in force."""
        checks = {"lr": (self.lr is None or self.lr > 0, "> 0"), "adam_eps": (self.adam_eps > 0, "> 0"), **checks}
        require(plugin, [(f"optimizer.{k}", getattr(self, k), ok, want) for k, (ok, want) in checks.items()])
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        idle = [f"optimizer.{k}={getattr(self, k)!r} acts only with {why}" for k, why in self.inert().items()
                if k in defaults and getattr(self, k) != defaults[k]]
        if idle:
            raise ValueError(f"{plugin}: not in force: " + "; ".join(idle) + "; set what it needs, or leave it at its default")

    def inert(self) -> dict[str, str]:
        """The fields the other settings, as they are, leave without effect: {field: what it needs}."""
        return {}


@dataclass
class MinibatchConfig(OptimConfig):
    """A plugin that reuses each batch (a ratio-corrected objective: PPO, GRPO)."""

    epochs: int = 1  # passes over each batch
    num_minibatches: int = 1  # minibatches per pass

    def check(self, plugin: str, **checks: tuple[bool, str]) -> None:
        super().check(plugin, **{"epochs": (self.epochs >= 1, "at least 1"),
                                 "num_minibatches": (self.num_minibatches >= 1, "at least 1"), **checks})

    def reused(self) -> bool:
        """Whether a batch is stepped on more than once: only then is the policy that samples it an
        old one (a ratio other than 1 to clip or guard)."""
        return self.epochs * self.num_minibatches > 1


@dataclass
class Loss:
    """One step's loss, as a plugin's `loss()` returns it."""

    loss: torch.Tensor  # the scalar minimised (reduced with token_mean or row_mean)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # diagnostics, averaged over the steps
    skip: bool | None = None  # True: too far from the sampling policy to step on (every rank agrees); None: never


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss's token mean over the global batch: this rank's masked sum over every rank's
    token count, times the number of ranks (DDP averages the gradients). One process: the
    masked mean. (b, T), (b, T) -> ()"""
    if not distributed.active():
        return numerics.masked_mean(x, mask)
    return distributed.loss_mean(x, mask)


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """The loss's mean over the global batch's rows (responses, pairs), as token_mean. (b,) -> ()"""
    if not distributed.active():
        return x.mean()
    n = distributed.all_sum(torch.tensor(float(x.numel()), device=x.device))
    return x.sum() / n.clamp(min=1) * distributed.world()


def step(objective: Any, policy: Any, opt: torch.optim.Optimizer, params: list, batch: Any) -> dict[str, float]:
    """One update of `objective` on `batch` (module doc); returns its metrics."""
    cfg = objective.cfg
    prepared = objective.prepare(batch)
    correction = getattr(cfg, "correction", "none")
    if correction != "none" and getattr(batch, "proposal_logprobs", None) is not None:  # drawn by q != pi
        prepared["is_weight"] = numerics.importance_weights(batch.logprobs, batch.proposal_logprobs, batch.mask,
                                                            correction, cfg.is_cap)
    reuses = isinstance(cfg, MinibatchConfig)
    policy.train()
    stats: dict[str, list[torch.Tensor]] = {}
    skipped = 0
    for epoch in range(cfg.epochs if reuses else 1):
        parts = ([collect.minibatch(batch, idx, **prepared)
                  for idx in collect.minibatch_indices(batch.input_ids.shape[0], cfg.num_minibatches, batch.mask.device)]
                 if reuses else [(batch, prepared)])
        for mb, t in parts:
            out = objective.loss(policy, mb, t, epoch)
            if out.skip is not None and distributed.any_rank(bool(out.skip), mb.mask.device):
                skipped += 1  # far outside the trust region: a step on it would blow up, not learn
                continue
            grad_norm = gradient_step(opt, params, out.loss, cfg.max_grad_norm)
            for name, value in {**out.stats, "optim/grad_norm": grad_norm}.items():
                stats.setdefault(name, []).append(value.detach())  # tensors: no device sync per minibatch
    metrics = numerics.means(stats)
    if reuses:
        metrics["policy/skipped_minibatches"] = skipped
    metrics.update(objective.finish(batch, prepared))
    return metrics


class Updater:
    """An objective bound to the policy it trains: the trained parameters, Adam over them (the
    plugin's lr and adam_eps), and `step(batch)`."""

    def __init__(self, objective: Any, policy: Any):
        self.objective, self.policy = objective, policy
        self.params = list(policy.trainable_parameters())
        self.opt = adam(self.params, lr=objective.cfg.lr, eps=objective.cfg.adam_eps)

    def step(self, batch: Any) -> dict[str, float]:
        return step(self.objective, self.policy, self.opt, self.params, batch)
