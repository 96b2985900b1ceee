"""A reward model trained by `rlhf-train-rm`, loaded read-only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rlhf.contracts.registry import register


@register("reward", "learned_rm")
class LearnedReward:
    @dataclass
    class Config:
        path: str = "???"  # run directory of rlhf-train-rm (or its reward_model/ folder, or any 1-label classifier)
        normalize: bool = True  # apply the mean/std stored by rlhf-train-rm (mean 0, std 1 on reference samples)
        batch_size: int = 64  # scoring batch size
        device: str = "auto"  # auto, cpu, cuda, ...
        trust_remote_code: bool = False  # run model code shipped with a hub repo

    def __init__(self, cfg: Config):
        if cfg.path in ("???", ""):
            raise ValueError("reward=learned_rm needs reward.path=<run directory written by rlhf-train-rm>")
        self.cfg = cfg
        self.model = None

    def _load(self) -> None:
        from rlhf.core.toolkit import runs
        from rlhf.core.toolkit.models import load_reward_model, pick_device

        path = Path(self.cfg.path)
        if (path / runs.REWARD_MODEL).is_dir():
            path = path / runs.REWARD_MODEL
        if not path.exists():
            raise FileNotFoundError(f"reward.path: no reward model at {self.cfg.path}")
        self.model, self.tokenizer = load_reward_model(str(path), pick_device(self.cfg.device), self.cfg.trust_remote_code)
        self.model.eval().requires_grad_(False)  # frozen: a judge, never trained by the policy
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward.path={path}: a reward model has one output, this one has {self.model.config.num_labels}")
        self.mean, self.std = 0.0, 1.0
        stats = path / runs.NORMALIZATION
        if self.cfg.normalize and stats.is_file():
            s = json.loads(stats.read_text())
            self.mean, self.std = s["mean"], max(s["std"], 1e-6)

    @torch.no_grad()
    def score(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        from rlhf.core.toolkit.models import rm_scores, text_of

        if self.model is None:
            self._load()
        texts = [text_of(q, r) for q, r in zip(queries, responses)]
        return ((rm_scores(self.model, self.tokenizer, texts, self.cfg.batch_size) - self.mean) / self.std).cpu()
