"""Batch sources: one per kind of batch an optimizer can consume (its `consumes`).

    rollouts          Rollout: k samples per prompt from the policy, scored  (rollouts.py)
    preference_pairs  PairBatch: pairs from the data, reference log-probs cached  (preference_pairs.py)
    sampled_pairs     PairBatch: two policy samples per prompt, labelled by the reward  (sampled_pairs.py)

A source makes the next batch, says what the batch shows before any update (its head
metrics) and whether it is fit to train on, and saves its data position in checkpoints
(the `BatchSource` Protocol). A new kind of batch is one class in one new file here,
decorated with `@source("<kind>")`: the loop needs no change.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from rlhf.contracts.interfaces import Sampling

if TYPE_CHECKING:
    from rlhf.contracts.interfaces import BatchSource, PolicyOptimizer, QuerySampler, RewardSource
    from rlhf.contracts.schema import DataConfig
    from rlhf.core.model.policy import Policy


@dataclass
class SourceContext:
    """What a run gives its batch source to build from."""

    policy: Policy
    reward: RewardSource
    sampler: QuerySampler
    optimizer: PolicyOptimizer
    prompts: list[list[int]]  # the training prompts, tokenised
    data: DataConfig
    seed: int
    proposal: Any = None  # what draws the rollouts (None: the policy itself)
    sampling: Sampling | None = None  # how the run samples (None: as the sampler says)
    env: Any = None  # episodes: the environment plugin (None: one prompt, one response)

    def how(self) -> Sampling:
        return self.sampling or Sampling(self.sampler.temperature, self.sampler.generation_kwargs())


_SOURCES: dict[str, type] = {}


def source(kind: str) -> Callable[[type], type]:
    """Class decorator: the class (with a `from_context(ctx)` classmethod) makes `kind` batches."""

    def wrap(cls: type) -> type:
        _SOURCES[kind] = cls
        return cls

    return wrap


def kinds() -> tuple[str, ...]:
    """Every kind of batch the core can make."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return tuple(sorted(_SOURCES))


def build(kind: str, ctx: SourceContext) -> BatchSource:
    if kind not in kinds():
        raise ValueError(f"optimizer consumes {kind!r}; the core provides {kinds()}")
    return _SOURCES[kind].from_context(ctx)


def nonfinite_scores(scores: torch.Tensor | None, texts: list[str]) -> str:
    """'' or which responses the reward source gave a non-finite score, for the error message."""
    if scores is None or torch.isfinite(scores).all():
        return ""
    bad = ~torch.isfinite(scores)
    i = int(bad.nonzero()[0])
    return (f"the reward source returned {scores[i].item()} for {int(bad.sum())} of {len(scores)} responses, "
            f"first row {i}: {texts[i]!r}")
