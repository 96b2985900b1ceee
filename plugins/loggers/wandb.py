"""Weights & Biases logger: online with a key, offline (syncable later) without one."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from rlhf.contracts.checks import require
from rlhf.contracts.interfaces import RunInfo
from rlhf.contracts.registry import register


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"beta": 0.1}} -> {"optimizer.beta": 0.1}: dashboards filter on flat keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.join(os.path.expanduser("~"), ".netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


@register("logger", "wandb")
class WandbLogger:
    @dataclass
    class Config:
        project: str = "rlhf"  # wandb project
        entity: Optional[str] = None  # team or user; null: your default
        group: Optional[str] = None  # run group; null: the sweep directory, so a sweep's runs group together
        name: Optional[str] = None  # run name; null: the run's overrides (e.g. optimizer.beta=0.1)
        mode: str = "auto"  # auto: online if a key is set, else offline; online, offline, disabled
        init_timeout: float = 30.0  # seconds to wait for the server before falling back to offline

    def __init__(self, cfg: Config):
        require("wandb", [("logger.wandb.mode", cfg.mode, cfg.mode in ("auto", "online", "offline", "disabled"),
                           "auto, online, offline or disabled")])
        if cfg.mode == "online" and not _has_key():  # wandb would ask for a key on the terminal, or wait
            raise ValueError(
                "logger.wandb.mode=online needs an API key: set WANDB_API_KEY or run `wandb login`; "
                "or use logger.wandb.mode=auto (offline without a key) or offline"
            )
        self.cfg = cfg
        self.run = None

    def start(self, run: RunInfo, config: Mapping[str, Any]) -> None:
        import wandb

        mode = self.cfg.mode
        if mode == "auto":
            mode = "online" if _has_key() else "offline"
        run_dir = run.run_dir
        kwargs = dict(
            project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group or run.group_dir,
            name=self.cfg.name or run.name, dir=run_dir, config=flatten(config), reinit="finish_previous",
            settings=wandb.Settings(init_timeout=self.cfg.init_timeout, silent=True),
        )
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # no network or a bad key: keep the run, log offline
            if mode != "online":
                raise
            warnings.warn(f"wandb online init failed ({e}); logging offline to {run_dir}/wandb", stacklevel=1)
            self.run = wandb.init(mode="offline", **kwargs)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_samples(self, rows, step: int) -> None:
        """Each evaluation's samples as a wandb Table (`samples`), one per evaluation step."""
        import wandb

        cols = list(dict.fromkeys(k for r in rows for k in r))
        self.run.log({"samples": wandb.Table(columns=["step", *cols], data=[[step, *(r.get(c) for c in cols)] for r in rows])},
                     step=step)

    def finish(self, summary: Mapping[str, Any]) -> None:
        for k, v in summary.items():
            self.run.summary[k] = v
        self.run.finish()
