"""One JSONL file for a whole sweep: every logged row of every run, tagged with the run's
name, ready for `pandas.read_json(path, lines=True)`. (Each run's own metrics.jsonl is
written by the core whatever the loggers.)"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from rlhf.contracts.interfaces import RunInfo
from rlhf.contracts.registry import register
from rlhf.contracts.safety import writes_file
from rlhf.core.toolkit import runs


@register("logger", "jsonl")
class JsonlLogger:
    @dataclass
    class Config:
        path: Optional[str] = writes_file(None)  # null: <sweep dir>/metrics_all.jsonl (or <run dir>/... for one run)

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.fd: int | None = None

    def start(self, run: RunInfo, config: Mapping[str, Any]) -> None:
        self.name = run.name
        path = self.cfg.path or os.path.join(run.group_dir, "metrics_all.jsonl")
        # O_APPEND with one write per line: parallel jobs of a sweep never interleave a line
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        os.write(self.fd, (runs.to_json({"run": self.name, "step": step, **metrics}) + "\n").encode())

    def finish(self, summary: Mapping[str, Any]) -> None:
        os.write(self.fd, (runs.to_json({"run": self.name, "summary": dict(summary)}) + "\n").encode())
        os.close(self.fd)
