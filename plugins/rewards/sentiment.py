"""Reward from a sentiment-analysis pipeline (transformers), frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register


@register("reward", "sentiment")
class SentimentReward:
    @dataclass
    class Config:
        model: str = "embedded"  # classifier: hub name, local dir, or "embedded" (built offline)
        positive_label: str = "POSITIVE"  # label whose score is the reward (case-insensitive)
        output: str = "prob"  # "prob": softmax probability, "logit": raw logit of that label
        score_query: bool = True  # score query + response (as in the IMDb example), or the response alone
        batch_size: int = 64  # pipeline batch size
        device: str = "auto"  # auto, cpu, cuda, ...
        trust_remote_code: bool = False  # run model code shipped with a hub repo

    def __init__(self, cfg: Config):
        require("sentiment", [("reward.output", cfg.output, cfg.output in ("prob", "logit"), "prob or logit")])
        self.cfg = cfg
        self._pipe = None

    def pipeline(self):
        if self._pipe is None:
            from transformers import pipeline

            path = self.cfg.model
            if path == "embedded":
                from rlhf.core.toolkit.models import sentiment_path

                path = sentiment_path()
            from rlhf.core.toolkit.models import pick_device

            device = pick_device(self.cfg.device)
            self._pipe = pipeline(
                "sentiment-analysis", model=path, device=device, top_k=None,
                trust_remote_code=self.cfg.trust_remote_code,
            )
            model = self._pipe.model.eval().requires_grad_(False)  # frozen: a judge, never trained
            labels = {v.lower(): v for v in model.config.id2label.values()}
            if self.cfg.positive_label.lower() not in labels:
                raise ValueError(
                    f"reward.positive_label={self.cfg.positive_label!r} is not a label of {path} "
                    f"(its labels: {sorted(labels.values())}); set reward.positive_label"
                )
            self._label = labels[self.cfg.positive_label.lower()]
        return self._pipe

    @torch.no_grad()
    def score(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        pipe = self.pipeline()
        texts = [q + " " + r if self.cfg.score_query else r for q, r in zip(queries, responses)]
        fn = "softmax" if self.cfg.output == "prob" else "none"
        outputs = pipe(texts, batch_size=self.cfg.batch_size, truncation=True, function_to_apply=fn)
        return torch.tensor([next(d["score"] for d in out if d["label"] == self._label) for out in outputs])
