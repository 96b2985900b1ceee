"""TensorBoard logger: every run of a sweep under one log directory, named by its overrides,
so `tensorboard --logdir <sweep dir>` shows the runs side by side."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from rlhf.contracts.interfaces import RunInfo
from rlhf.contracts.registry import register
from rlhf.contracts.safety import writes_file


@register("logger", "tensorboard")
class TensorBoardLogger:
    @dataclass
    class Config:
        log_dir: Optional[str] = writes_file(None)  # null: <sweep dir>/tensorboard for a sweep, <run dir>/tensorboard for one run

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.writer = None

    def start(self, run: RunInfo, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = self.cfg.log_dir or os.path.join(run.group_dir, "tensorboard")
        name = run.name.replace(os.sep, "_") or "run"
        self.writer = SummaryWriter(log_dir=os.path.join(root, name))
        from omegaconf import OmegaConf

        self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(OmegaConf.create(dict(config))) + "\n```", 0)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_samples(self, rows, step: int) -> None:
        """Each evaluation's samples as a markdown table under the `samples` text tab."""
        cols = list(dict.fromkeys(k for r in rows for k in r))
        def cell(v):
            return (f"{v:.3g}" if isinstance(v, float) else str(v)).replace("|", "\\|").replace("\n", " ")
        table = "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                          + ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows])
        self.writer.add_text("samples", table, step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        for k, v in summary.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"summary/{k}", v, 0)
        self.writer.close()
