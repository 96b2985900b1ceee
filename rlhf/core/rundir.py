"""What a run leaves on disk: the one place that names the run directory's files.

    <run>/
        .hydra/config.yaml      the composed config (Hydra)
        .hydra/overrides.yaml   the command line's overrides (Hydra)
        metrics.jsonl           one JSON object per logged step (RunRecorder)
        summary.json            the final figures (RunRecorder)
        samples/step_N.jsonl    held-out generations of each evaluation
        checkpoints/step_N/     complete checkpoints (rlhf.core.checkpoint)
        final/                  the trained adapters (or weights), value head and tokenizer
        error.txt               the traceback of a run that raised
    <rm run>/reward_model/      a reward model of rlhf-train-rm, and its normalization.json
    <sweep>/multirun.yaml       a sweep's config and overrides (Hydra), beside its runs
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HYDRA = ".hydra"
CONFIG = f"{HYDRA}/config.yaml"
OVERRIDES = f"{HYDRA}/overrides.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
FINAL = "final"
ERROR = "error.txt"
REWARD_MODEL = "reward_model"
NORMALIZATION = "normalization.json"
SWEEP_RECORD = "multirun.yaml"


def is_run(path: Path) -> bool:
    """A directory written by one of the commands (Hydra recorded its config there)."""
    return (Path(path) / CONFIG).is_file()


class RunRecorder:
    """Writes `metrics.jsonl` (one object per logged step) and `summary.json`, always."""

    def __init__(self, run_dir: Path, truncate_to: int | None = None):
        self.run_dir = run_dir
        path = run_dir / METRICS
        if truncate_to is not None:  # a resumed run: drop the rows logged after its checkpoint
            with open(path, "r+") as f:
                f.truncate(truncate_to)
        self._file = open(path, "a")

    @property
    def offset(self) -> int:
        """Bytes written so far: where a resumed run cuts the file."""
        return self._file.tell()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        self._file.close()
