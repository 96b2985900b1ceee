"""A rule-based sentiment judge (VADER, Hutto & Gilbert 2014): no model, no training.

Independent of any classifier the policy is trained against, so as an evaluation judge
(`eval.judges=[lexicon]`) it shows when a learned reward rises but sentiment does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register

OUTPUTS = ("compound", "pos", "neg")


@register("reward", "lexicon")
class LexiconReward:
    @dataclass
    class Config:
        output: str = "compound"  # compound: overall polarity in [-1, 1]; pos / neg: share of such words
        score_query: bool = True  # score query + response, or the response alone

    def __init__(self, cfg: Config):
        require("lexicon", [("reward.output", cfg.output, cfg.output in OUTPUTS, f"one of {', '.join(OUTPUTS)}")])
        self.cfg = cfg
        self._analyzer = None

    def score(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        if self._analyzer is None:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

            self._analyzer = SentimentIntensityAnalyzer()
        texts = [q + " " + r if self.cfg.score_query else r for q, r in zip(queries, responses)]
        return torch.tensor([self._analyzer.polarity_scores(t)[self.cfg.output] for t in texts])
