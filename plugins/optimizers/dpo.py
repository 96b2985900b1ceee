"""Direct Preference Optimization (Rafailov et al. 2023), offline or online.

Offline, pairs come from the data (`data.pairs`); online (`online=true`), two responses
per prompt are sampled from the current policy and the reward source picks the chosen
one, the loss L(x, {y1, y2}, r). Reference log-probs come from the adapter-disabled base
(the core caches them per offline pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from rlhf_plugins.optimizers.detectors import chosen_still, dpo_displacement, dpo_saturated

from rlhf.contracts.interfaces import PREFERENCE_PAIRS, SAMPLED_PAIRS, PairBatch
from rlhf.contracts.metrics import (
    LOGPS_CHOSEN,
    LOGPS_REJECTED,
    LOSS_DPO,
    REWARDS_ACCURACY,
    REWARDS_CHOSEN,
    REWARDS_MARGIN,
    REWARDS_REJECTED,
)
from rlhf.contracts.registry import register
from rlhf.contracts.update import Loss, OptimConfig
from rlhf.core.toolkit.reductions import row_mean


def sigmoid_loss(logits: torch.Tensor, beta: float, label_smoothing) -> torch.Tensor:
    """-log sigma(beta h) with h = pi_logratios - ref_logratios; with label smoothing eps
    (conservative DPO, the label is flipped with probability eps):
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)


def ipo_loss(logits: torch.Tensor, beta: float, label_smoothing) -> torch.Tensor:
    """IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, h on sequence log-likelihoods; with a
    label flipped with probability eps the target margin becomes (1 - 2 eps) / (2 beta)."""
    return (logits - (1 - 2 * label_smoothing) / (2 * beta)) ** 2


LOSSES = {"sigmoid": sigmoid_loss, "ipo": ipo_loss}


@register("optimizer", "dpo")
class DPO:
    @dataclass
    class Config(OptimConfig):
        lr: Optional[float] = None  # Adam learning rate; null: 2e-4 offline, 1e-3 online (see below)
        beta: float = 0.1  # inverse temperature of the implicit reward beta log(pi / pi_ref)
        label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
        loss_type: str = "sigmoid"  # sigmoid (DPO) or ipo
        online: bool = False  # sample two responses per prompt and let the reward source label them

    detectors = (dpo_displacement, dpo_saturated)  # over the metrics only it logs
    tiny_steps = staticmethod(chosen_still)  # its evidence of tiny updates

    def __init__(self, cfg: Config):
        cfg.check("dpo", beta=(cfg.beta > 0, "> 0"), label_smoothing=(0 <= cfg.label_smoothing < 0.5, "in [0, 0.5)"),
                  loss_type=(cfg.loss_type in LOSSES, " or ".join(LOSSES)))
        # Offline pairs are fixed and off-policy: larger steps push the rejected responses'
        # likelihood down until the policy writes gibberish (measured on the embedded default:
        # lr 1e-3 offline reached KL ~60 nats). Fresh online pairs tolerate, and need, more.
        if cfg.lr is None:
            cfg.lr = 1e-3 if cfg.online else 2e-4
        self.cfg = cfg
        self.beta = cfg.beta  # the objective's KL coefficient, as configured (eval.kl_to_optimum)
        self.consumes = SAMPLED_PAIRS if cfg.online else PREFERENCE_PAIRS

    def state_dict(self) -> dict:
        return {}  # the torch optimizer holds all of DPO's state

    def load_state_dict(self, state: dict) -> None:
        pass

    def prepare(self, b: PairBatch) -> dict:
        return {}  # the reference log-probs come with the batch

    def logratios(self, policy, b: PairBatch) -> dict[str, torch.Tensor]:
        """Summed log-probs of the chosen and rejected responses, the policy's and the reference's. (B,) each"""
        B = b.input_ids.shape[0] // 2
        logprobs, _, _ = policy.token_logprobs(b.input_ids, b.attention_mask, b.query_len, with_values=False)
        logps = (logprobs * b.mask).sum(1)  # (2B,)
        return {"chosen": logps[:B], "rejected": logps[B:], "ref_chosen": b.ref_logps[:B], "ref_rejected": b.ref_logps[B:]}

    def loss(self, policy, b: PairBatch, t: dict, epoch: int) -> Loss:
        c = self.cfg
        lp = self.logratios(policy, b)
        pi_logratios = lp["chosen"] - lp["rejected"]
        ref_logratios = lp["ref_chosen"] - lp["ref_rejected"]
        h = pi_logratios - ref_logratios  # (B,)
        # soft labels (Bradley-Terry pairs): the probability the chosen one is preferred
        eps = c.label_smoothing if b.preference is None else 1 - b.preference
        loss = row_mean(LOSSES[c.loss_type](h, c.beta, eps))
        with torch.no_grad():
            chosen_rewards = c.beta * (lp["chosen"] - lp["ref_chosen"])
            rejected_rewards = c.beta * (lp["rejected"] - lp["ref_rejected"])
            stats = {
                LOSS_DPO: loss,
                REWARDS_CHOSEN: chosen_rewards.mean(),
                REWARDS_REJECTED: rejected_rewards.mean(),
                REWARDS_MARGIN: (chosen_rewards - rejected_rewards).mean(),
                REWARDS_ACCURACY: (chosen_rewards > rejected_rewards).float().mean(),
                LOGPS_CHOSEN: lp["chosen"].mean(),
                LOGPS_REJECTED: lp["rejected"].mean(),
            }
        return Loss(loss, stats)

    def finish(self, b: PairBatch, t: dict) -> dict[str, float]:
        return {}
