"""`rlhf-train`: the Hydra entry point. Discovery first, so plugins are in the ConfigStore."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlhf import registry
from rlhf.config import store_schema
from rlhf.interfaces import RunInfo

log = logging.getLogger("rlhf")
ERROR_FILE = "error.txt"  # in the run directory of a run that raised, with its traceback


def run_info() -> RunInfo:
    """Name and group of this run, from Hydra: a sweep's runs share the sweep directory and
    are named by the overrides the sweep varies (optimizer.beta=0.1,sampler.temperature=0.7)."""
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    if hc.mode != RunMode.MULTIRUN:
        return RunInfo(run_dir=run_dir, name=hc.job.override_dirname or Path(run_dir).name, group_dir=run_dir)
    swept = sweep_keys(Path(hc.sweep.dir), hc.sweeper.get("params") or {})
    mine = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return RunInfo(run_dir=run_dir, name=",".join(mine) or Path(run_dir).name, group_dir=str(Path(hc.sweep.dir).resolve()))


def sweep_keys(sweep_dir: Path, sweeper_params) -> set[str]:
    """Keys a sweep varies: swept command-line overrides (from multirun.yaml) and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    keys = set(sweeper_params.keys())
    try:
        task = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
    except (OSError, AttributeError):
        return keys
    parsed = OverridesParser.create().parse_overrides(list(task))
    return keys | {o.key_or_group for o in parsed if o.is_sweep_override()}


def parallel_jobs() -> int:
    """How many jobs the launcher runs at once (joblib's n_jobs), 1 for sequential launchers."""
    hc = HydraConfig.get()
    n = hc.launcher.get("n_jobs") if hc.mode == RunMode.MULTIRUN and "n_jobs" in hc.launcher else None
    if n is None:
        return 1
    return (os.cpu_count() or 1) if n < 0 else n


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _train(cfg: DictConfig) -> float:
    import torch

    from rlhf.trainer import Trainer

    info = run_info()
    if cfg.threads == 0 and parallel_jobs() > 1:  # share the cores, do not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel_jobs()))
    try:
        s = Trainer(cfg, Path(info.run_dir), info).fit()
    except Exception:
        # into the job's own log (Hydra writes it to the run directory) and a file of its own,
        # so a failed job of a sweep can be found and read after the others finish
        log.exception("run failed")
        Path(info.run_dir, ERROR_FILE).write_text(traceback.format_exc())
        raise
    print(f"held-out reward   {s['reward_start']:.3f} -> {s['reward_end']:.3f}")
    print(f"KL to reference   {s['kl_start']:.3f} -> {s['kl_end']:.3f} nats")
    print(f"run directory     {info.run_dir}  ({s['wall_s']:.0f} s)")
    return s["reward_end"]


def main() -> None:
    from rlhf import sweep

    registry.discover()
    store_schema()
    try:
        _train()
    finally:  # also when Hydra exits because a job of a sweep failed: the others' results stand
        sweep.report()


if __name__ == "__main__":
    main()
