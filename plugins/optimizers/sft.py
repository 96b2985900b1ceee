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
from rlhf_plugins.optimizers.detectors import chosen_still

from rlhf.contracts.interfaces import PREFERENCE_PAIRS, PairBatch
from rlhf.contracts.metrics import LOGPS_CHOSEN, LOGPS_CHOSEN_VS_REF
from rlhf.contracts.registry import register
from rlhf.contracts.update import Loss, OptimConfig
from rlhf.core.toolkit.reductions import token_mean


@register("optimizer", "sft")
class PreferredFT:
    @dataclass
    class Config(OptimConfig):
        lr: float = 2e-4  # Adam learning rate (DPO's offline default: the same pairs, the same model)

    tiny_steps = staticmethod(chosen_still)  # log pi(chosen) hardly moving
    consumes = PREFERENCE_PAIRS

    def __init__(self, cfg: Config):
        cfg.check("sft")
        self.cfg = cfg

    def state_dict(self) -> dict:
        return {}  # the torch optimizer holds all of the state

    def load_state_dict(self, state: dict) -> None:
        pass

    def prepare(self, b: PairBatch) -> dict:
        return {}

    def loss(self, policy, b: PairBatch, t: dict, epoch: int) -> Loss:
        B = b.input_ids.shape[0] // 2  # rows [0, B) are the chosen responses; the rejected ones are not used
        logprobs, _, _ = policy.token_logprobs(b.input_ids[:B], b.attention_mask[:B], b.query_len, with_values=False)
        mask = b.mask[:B]  # (B, T) the chosen responses' tokens
        loss = -token_mean(logprobs, mask)  # mean negative log-likelihood per chosen token
        with torch.no_grad():
            chosen_logps = (logprobs * mask).sum(1)  # (B,)
            stats = {"loss/sft": loss, LOGPS_CHOSEN: chosen_logps.mean(),
                     LOGPS_CHOSEN_VS_REF: (chosen_logps - b.ref_logps[:B]).mean()}
        return Loss(loss, stats)

    def finish(self, b: PairBatch, t: dict) -> dict[str, float]:
        return {}
