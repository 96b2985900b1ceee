"""The policy k updates old: what an asynchronous trainer samples from (one-step-off training is
k = 1). It keeps the trained weights of the last k + 1 updates (the adapters: a few MB; with
full fine-tuning, whole copies) and samples with the oldest, recording that policy's exact
log q; the update then corrects towards the current policy (`optimizer.correction`).
Without a correction the stale samples bias the update; the README's conformance table
measures by how much. On one process this is the staleness, not the speed: generation is not
overlapped with the update."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from rlhf.contracts.checks import require
from rlhf.contracts.interfaces import Sampling
from rlhf.contracts.registry import register
from rlhf.core.toolkit.sampling import generate


@register("proposal", "stale")
class Stale:
    @dataclass
    class Config:
        k: int = 1  # updates the sampling policy lags behind the trained one

    is_policy = False

    def __init__(self, cfg: Config):
        require("proposal", [("proposal.k", cfg.k, cfg.k >= 1, "at least 1")])
        self.cfg = cfg
        self.kept: deque[dict[str, torch.Tensor]] = deque(maxlen=cfg.k + 1)  # oldest first

    def after_update(self, policy) -> None:
        self.kept.append({k: v.detach().clone() for k, v in policy.trainable_state().items()})

    @torch.no_grad()
    def sample(self, policy, queries, s: Sampling, with_values, rows):
        if not self.kept:  # before the first update the oldest policy is the current one
            self.after_update(policy)
        current = {k: v.detach().clone() for k, v in policy.trainable_state().items()}
        policy.load_trainable_state(self.kept[0])
        try:
            return generate(policy, queries, s.generation_kwargs(), s.temperature, False, rows, exact_q=True)
        finally:
            policy.load_trainable_state(current)

    def state_dict(self) -> dict:
        return {"kept": list(self.kept)}

    def load_state_dict(self, state: dict) -> None:
        self.kept = deque(state["kept"], maxlen=self.cfg.k + 1)
