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

from rlhf.contracts.checks import require
from rlhf.contracts.interfaces import PairBatch
from rlhf.contracts.registry import register
from rlhf.core.optim import adam, gradient_step


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
    class Config:
        lr: Optional[float] = None  # Adam learning rate; null: 2e-4 offline, 1e-3 online (see below)
        beta: float = 0.1  # inverse temperature of the implicit reward beta log(pi / pi_ref)
        label_smoothing: float = 0.0  # conservative DPO: assumed probability that a label is flipped
        loss_type: str = "sigmoid"  # sigmoid (DPO) or ipo
        online: bool = False  # sample two responses per prompt and let the reward source label them
        max_grad_norm: float = 1.0  # gradient-norm clipping; <= 0 turns it off

    needs_value_head = False
    samples_per_prompt = 1

    def __init__(self, cfg: Config):
        require("dpo", [(f"optimizer.{k}", getattr(cfg, k), ok, want) for k, ok, want in (
            ("lr", cfg.lr is None or cfg.lr > 0, "> 0, or null for the default"),
            ("beta", cfg.beta > 0, "> 0"),
            ("label_smoothing", 0 <= cfg.label_smoothing < 0.5, "in [0, 0.5)"),
            ("loss_type", cfg.loss_type in LOSSES, " or ".join(LOSSES)),
        )])
        self.cfg = cfg
        self.beta = cfg.beta  # the objective's KL coefficient, as configured (eval.kl_to_optimum)
        self.consumes = "sampled_pairs" if cfg.online else "preference_pairs"

    def state_dict(self) -> dict:
        return {}  # the torch optimizer holds all of DPO's state

    def load_state_dict(self, state: dict) -> None:
        pass

    def setup(self, policy, temperature: float) -> torch.optim.Optimizer:
        self.policy = policy
        self.params = list(policy.trainable_parameters())
        # Offline pairs are fixed and off-policy: larger steps push the rejected responses'
        # likelihood down until the policy writes gibberish (measured on the embedded default:
        # lr 1e-3 offline reached KL ~60 nats). Fresh online pairs tolerate, and need, more.
        lr = self.cfg.lr if self.cfg.lr is not None else (1e-3 if self.cfg.online else 2e-4)
        self.opt = adam(self.params, lr=lr)
        return self.opt

    def loss(self, b: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch, and the log-probs the metrics need."""
        c = self.cfg
        B = b.input_ids.shape[0] // 2
        logprobs, _, _ = self.policy.token_logprobs(b.input_ids, b.attention_mask, b.query_len, with_values=False)
        logps = (logprobs * b.mask).sum(1)  # (2B,)
        chosen_logps, rejected_logps = logps[:B], logps[B:]
        ref_chosen_logps, ref_rejected_logps = b.ref_logps[:B], b.ref_logps[B:]

        pi_logratios = chosen_logps - rejected_logps
        ref_logratios = ref_chosen_logps - ref_rejected_logps
        h = pi_logratios - ref_logratios  # (B,)
        # soft labels (Bradley-Terry pairs): the probability the chosen one is preferred
        eps = c.label_smoothing if b.preference is None else 1 - b.preference
        loss = LOSSES[c.loss_type](h, c.beta, eps).mean()
        return loss, {"chosen": chosen_logps, "rejected": rejected_logps, "ref_chosen": ref_chosen_logps,
                      "ref_rejected": ref_rejected_logps}

    def update(self, b: PairBatch) -> dict[str, float]:
        c = self.cfg
        self.policy.train()
        loss, lp = self.loss(b)
        chosen_logps, rejected_logps = lp["chosen"], lp["rejected"]
        ref_chosen_logps, ref_rejected_logps = lp["ref_chosen"], lp["ref_rejected"]
        grad_norm = gradient_step(self.opt, self.params, loss, c.max_grad_norm)

        with torch.no_grad():
            chosen_rewards = c.beta * (chosen_logps - ref_chosen_logps)
            rejected_rewards = c.beta * (rejected_logps - ref_rejected_logps)
            return {
                "loss/dpo": loss.item(),
                "rewards/chosen": chosen_rewards.mean().item(),
                "rewards/rejected": rejected_rewards.mean().item(),
                "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
                "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
                "logps/chosen": chosen_logps.mean().item(),
                "logps/rejected": rejected_logps.mean().item(),
                "optim/grad_norm": grad_norm.item(),
            }
