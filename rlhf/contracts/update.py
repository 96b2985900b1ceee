"""What an optimizer plugin and the core's update loop agree on: the settings of the step the
core takes on a batch (a plugin's config declares them: `OptimConfig.update`), and the loss a
plugin returns for a batch or a minibatch (`Loss`).

A plugin's config derives from `OptimConfig` (one gradient step on each whole batch) or
`MinibatchConfig` (epochs over shuffled minibatches: a ratio-corrected objective, PPO and
GRPO), and names in `inert` the fields its other settings leave without effect, which the
check then refuses (a setting a run accepts is in force).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhf.contracts.checks import require

if TYPE_CHECKING:
    import torch

# the importance weights the core applies to samples of a proposal q != pi (optimizer.correction)
CORRECTIONS = ("none", "token_tis", "sequence_mis", "sequence")


@dataclass(frozen=True)
class UpdateSettings:
    """How the core steps on a batch; read by the update loop and nothing else."""

    lr: float  # Adam's learning rate
    adam_eps: float  # Adam's epsilon
    max_grad_norm: float  # gradient-norm clipping; <= 0 turns it off
    epochs: int = 1  # passes over each batch
    num_minibatches: int | None = None  # shuffled minibatches per pass; None: the whole batch, unshuffled
    correction: str = "none"  # importance weights for samples of a proposal q != pi (CORRECTIONS)
    is_cap: float = 2.0  # token_tis: a token's cap; sequence_mis: the band of a response's weight


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

    def update(self) -> UpdateSettings:
        """The step the core takes on each batch."""
        return UpdateSettings(lr=self.lr, adam_eps=self.adam_eps, max_grad_norm=self.max_grad_norm)


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

    def update(self) -> UpdateSettings:
        return dataclasses.replace(super().update(), epochs=self.epochs, num_minibatches=self.num_minibatches)


@dataclass
class Loss:
    """One step's loss, as a plugin's `loss()` returns it."""

    loss: torch.Tensor  # the scalar minimised (reduced with token_mean or row_mean)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # diagnostics, averaged over the steps
    skip: bool | None = None  # True: too far from the sampling policy to step on (every rank agrees); None: never
