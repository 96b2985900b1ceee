"""Preferred-FT: maximum likelihood on the chosen response of each preference pair.

The baseline of the DPO paper (Rafailov et al. 2023, sec. 6): supervised fine-tuning on
the preferred completions only, the rejected ones and the reference left out,

    L = - sum_t log pi(y_w,t | x, y_w,<t) / |y_w|      (mean over the batch's chosen tokens)

It is the maximum-likelihood contrast to the reward-weighted methods: it moves pi towards
the distribution of the chosen responses, whatever their reward margin over the rejected
ones, and nothing holds it near the reference (no beta: the KL it reaches is whatever
imitation costs). Reads the same pairs as DPO (`data.pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.contracts.checks import require
from rlhf.contracts.interfaces import PairBatch
from rlhf.contracts.registry import register
from rlhf.core.optim import adam, gradient_step


@register("optimizer", "sft")
class PreferredFT:
    @dataclass
    class Config:
        lr: float = 2e-4  # Adam learning rate (DPO's offline default: the same pairs, the same model)
        max_grad_norm: float = 1.0  # gradient-norm clipping; <= 0 turns it off

    needs_value_head = False
    samples_per_prompt = 1
    consumes = "preference_pairs"
    beta = 0.0  # no KL term in the objective: nothing to compare with a closed-form optimum

    def __init__(self, cfg: Config):
        require("sft", [("optimizer.lr", cfg.lr, cfg.lr > 0, "> 0")])
        self.cfg = cfg

    def state_dict(self) -> dict:
        return {}  # the torch optimizer holds all of the state

    def load_state_dict(self, state: dict) -> None:
        pass

    def setup(self, policy, temperature: float) -> torch.optim.Optimizer:
        self.policy = policy
        self.params = list(policy.trainable_parameters())
        self.opt = adam(self.params, lr=self.cfg.lr)
        return self.opt

    def update(self, b: PairBatch) -> dict[str, float]:
        self.policy.train()
        B = b.input_ids.shape[0] // 2  # rows [0, B) are the chosen responses; the rejected ones are not used
        logprobs, _, _ = self.policy.token_logprobs(b.input_ids[:B], b.attention_mask[:B], b.query_len, with_values=False)
        mask = b.mask[:B]  # (B, T) the chosen responses' tokens
        tokens = mask.sum().clamp(min=1)
        loss = -(logprobs * mask).sum() / tokens  # mean negative log-likelihood per chosen token
        grad_norm = gradient_step(self.opt, self.params, loss, self.cfg.max_grad_norm)
        with torch.no_grad():
            chosen_logps = (logprobs * mask).sum(1)  # (B,)
            return {
                "loss/sft": loss.item(),
                "logps/chosen": chosen_logps.mean().item(),
                "logps/chosen_vs_ref": (chosen_logps - b.ref_logps[:B]).mean().item(),
                "optim/grad_norm": grad_norm.item(),
            }
