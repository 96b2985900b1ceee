"""`rlhf-train`: the Hydra entry point. Discovery first, so plugins are in the ConfigStore."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlhf.apps import sweep
from rlhf.contracts import registry, schema
from rlhf.contracts.interfaces import RunInfo
from rlhf.core import checkpoint, distributed, rundir
from rlhf.core.preemption import Preemption, Requeued, resume_point, under_submitit

log = logging.getLogger("rlhf")


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
        task = OmegaConf.load(sweep_dir / rundir.SWEEP_RECORD).hydra.overrides.task
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


@hydra.main(config_path="pkg://rlhf.conf", config_name="config", version_base="1.3")
def _train(cfg: DictConfig) -> float:
    import torch

    from rlhf.core.trainer import Trainer

    info = run_info()
    sharing = parallel_jobs() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this machine
    granted = HydraConfig.get().launcher.get("cpus_per_task") if under_submitit() else None
    if cfg.threads == 0 and granted:  # a submitit job: the cores it was given
        torch.set_num_threads(int(granted))
    elif cfg.threads == 0 and sharing > 1:  # share the cores, do not oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // sharing))
    resume = None
    if cfg.resume:
        resume = checkpoint.complete(Path(info.run_dir))[-1]
        print(f"resuming {info.run_dir} from {resume.name}")
    preemption = Preemption()
    if preemption.install():  # a submitit job: a requeued one continues from its checkpoint
        resume = resume or resume_point(Path(info.run_dir))
        if resume is not None:
            print(f"requeued: resuming {info.run_dir} from {resume.name}")
    try:
        try:
            s = Trainer(cfg, Path(info.run_dir), info).fit(resume=resume, preemption=preemption if preemption.installed else None)
        except Requeued:
            raise
        except SystemExit as e:  # a plugin's sys.exit(): a failed job, not the end of the sweep
            raise RuntimeError(f"the run called sys.exit({e.code!r})") from e
    except Exception:
        # into the job's own log (Hydra writes it to the run directory) and a file of its own,
        # so a failed job of a sweep can be found and read after the others finish
        log.exception("run failed")
        if distributed.is_main():
            Path(info.run_dir, rundir.ERROR).write_text(traceback.format_exc())
        raise
    if not distributed.is_main():
        return 0.0
    print(f"held-out reward   {s['reward_start']:.3f} -> {s['reward_end']:.3f}")
    print(f"KL to reference   {s['kl_start']:.3f} -> {s['kl_end']:.3f} nats")
    print(f"run directory     {info.run_dir}  ({s['wall_s']:.0f} s)")
    return s["reward_end"]


# Settings a resumed run may change: they decide how long it runs, what it logs and
# where, not what a step computes (a linear lr schedule makes train.steps one that does).
RESUME_MAY_CHANGE = ("train.steps", "train.save_final", "eval.", "logger", "checkpoint.", "threads", "device",
                     "resume", "resume_force")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def resume_argv(argv: list[str]) -> list[str]:
    """`rlhf-train resume=<run dir> [overrides]` -> the run's own overrides, then the new
    ones, in the run's own directory. Refuses (SystemExit, naming the fields) when the new
    overrides change what a step computes, unless resume_force=true."""
    from omegaconf import OmegaConf

    args = argv[1:]
    given = [a for a in args if a.startswith("resume=")]
    if not given:
        return argv
    if any(a in ("-m", "--multirun") for a in args):
        raise SystemExit("rlhf-train: resume= continues one run; it cannot be combined with -m")
    run_dir = Path(given[-1].split("=", 1)[1]).expanduser().resolve()
    if not rundir.is_run(run_dir):
        raise SystemExit(f"rlhf-train: resume={run_dir}: not a run directory (no .hydra/config.yaml)")
    if not checkpoint.complete(run_dir):
        raise SystemExit(f"rlhf-train: resume={run_dir}: no complete checkpoint in {run_dir / checkpoint.DIR}")
    ours = ("resume=", "resume_force=", "hydra.")
    before = [str(o) for o in OmegaConf.load(run_dir / rundir.OVERRIDES) if not str(o).startswith(ours)]
    new = [a for a in args if not a.startswith("resume=")]
    recorded = OmegaConf.load(run_dir / rundir.CONFIG)
    try:
        prospective = schema.compose([*before, *[a for a in new if not a.startswith("hydra.")]])
    except Exception as e:
        raise SystemExit(f"rlhf-train: resume={run_dir}: the overrides do not compose: {e}") from e
    old_flat, new_flat = _flat(OmegaConf.to_container(recorded)), _flat(OmegaConf.to_container(prospective))
    may_change = RESUME_MAY_CHANGE if prospective.train.lr_schedule == "constant" else RESUME_MAY_CHANGE[1:]
    changed = sorted(k for k in set(old_flat) | set(new_flat)
                     if old_flat.get(k, "<absent>") != new_flat.get(k, "<absent>") and not k.startswith(may_change))
    if changed and not prospective.resume_force:
        shown = "; ".join(f"{k}: {old_flat.get(k, '<absent>')!r} -> {new_flat.get(k, '<absent>')!r}" for k in changed[:12])
        raise SystemExit(
            f"rlhf-train: resume={run_dir} refused: these settings change what a step computes, so the run would "
            f"not continue the one it resumes: {shown}{' ...' if len(changed) > 12 else ''}. "
            "Start a new run, or add resume_force=true to continue anyway."
        )
    if changed:
        log.warning("resuming with changed settings (resume_force=true): %s", ", ".join(changed))
    # the run's own overrides, then the new ones; its directory; one run even if a preset sweeps
    return [argv[0], *before, *new, f"resume={run_dir}", f"hydra.run.dir={run_dir}", "hydra.mode=RUN"]


def data_parallel_argv(argv: list[str]) -> list[str]:
    """Under torchrun (or accelerate launch) with several processes: join the process group
    and give every rank rank 0's run directory; only rank 0 writes Hydra's files and log."""
    if distributed.env_world_size() <= 1:
        return argv
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        raise SystemExit("rlhf-train: a sweep (-m) runs each job as one process; start data-parallel runs one at a time")
    distributed.setup()
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in argv[1:]):
        import datetime

        now = datetime.datetime.now()
        extra.append("hydra.run.dir=" + distributed.broadcast_object(f"outputs/{now:%Y-%m-%d}/{now:%H-%M-%S}"))
    if not distributed.is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return [*argv, *extra]


def main() -> None:
    registry.discover()
    schema.store()
    sys.argv = resume_argv(sys.argv)
    sys.argv = data_parallel_argv(sys.argv)
    try:
        _train()
        distributed.barrier()  # ranks leave together: one tearing down gloo while another still talks aborts it
    finally:  # also when Hydra exits because a job of a sweep failed: the others' results stand
        sweep.report()
        if distributed.active():
            import torch

            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
