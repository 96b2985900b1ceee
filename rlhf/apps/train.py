"""`rlhf-train`: the Hydra entry point. Discovery first, so plugins are in the ConfigStore."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlhf.apps import hydra_setup, sweep
from rlhf.contracts import safety, schema
from rlhf.contracts.errors import OneLine, Refused
from rlhf.contracts.interfaces import RunInfo
from rlhf.core.parallel import distributed
from rlhf.core.run import checkpoint, rundir
from rlhf.core.run.preemption import Interrupt, Interrupted, Preemption, Requeued, under_submitit

log = logging.getLogger("rlhf")


def run_info() -> RunInfo:
    """Name and group of this run, from Hydra: a sweep's runs share the sweep directory and
    are named by the overrides the sweep varies (optimizer.beta=0.1,sampler.temperature=0.7).
    A job of a sweep resumed on its own keeps its sweep's group and its name."""
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    sweep_dir = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else Path(run_dir).parent
    if hc.mode != RunMode.MULTIRUN and not (sweep_dir / rundir.SWEEP_RECORD).is_file():
        return RunInfo(run_dir=run_dir, name=hc.job.override_dirname or Path(run_dir).name, group_dir=run_dir)
    swept = sweep_keys(sweep_dir, hc.sweeper.get("params") or {})
    mine = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return RunInfo(run_dir=run_dir, name=",".join(mine) or Path(run_dir).name, group_dir=str(sweep_dir.resolve()))


def sweep_keys(sweep_dir: Path, sweeper_params) -> set[str]:
    """Keys a sweep varies: swept command-line overrides (from multirun.yaml) and sweeper params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    keys = set(sweeper_params.keys())
    try:
        recorded = OmegaConf.load(sweep_dir / rundir.SWEEP_RECORD).hydra
        task = recorded.overrides.task
    except (OSError, AttributeError):
        return keys
    keys |= set((recorded.sweeper.get("params") or {}).keys())
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
    from rlhf.core.loop.trainer import preflight

    distributed.setup()  # torchrun's ranks joined before Hydra; a submitit job of several tasks joins here
    info = run_info()
    run_dir = Path(info.run_dir)
    single = HydraConfig.get().mode == RunMode.RUN
    plugins = None
    if single:  # a settings error: one line, and no run directory left behind (a sweep's job: a failed job)
        with refused_in_one_line(run_dir):
            plugins = preflight(cfg)
    preemption = Preemption()
    owner, same_job = claim(run_dir, cfg, submitit_job_id() if preemption.install() else None, single)
    stop = preemption if preemption.installed else Interrupt().install()  # Ctrl-C and SIGTERM
    try:
        s = run(cfg, info, plugins, resume_from(cfg, run_dir, same_job), stop, owner, single, same_job)
    finally:
        if owner is not None:
            owner.release()  # (a second release does nothing)
        if isinstance(stop, Interrupt):
            stop.uninstall()
    if not distributed.is_main():
        return 0.0
    (run_dir / rundir.ERROR).unlink(missing_ok=True)  # a resumed run that ends well has no error to show
    report(s, run_dir)
    return s["reward_end"]


@contextlib.contextmanager
def refused_in_one_line(run_dir: Path, owner: rundir.RunLock | None = None) -> Iterator[None]:
    """Around what may refuse a new run (a setting, a data file, a model): one line, the run
    directory's lock released and the directory removed if the run left nothing in it."""
    try:
        with hydra_setup.refusing():
            yield
    except SystemExit:
        if owner is not None:
            owner.release()
        rundir.discard_if_empty(run_dir)
        raise


def claim(run_dir: Path, cfg: DictConfig, job: str | None, single: bool) -> tuple[rundir.RunLock | None, bool]:
    """The run directory, owned by the one process that writes it (rank 0), and whether this is
    submitit's requeue of the very job that wrote it; the verdict reaches every rank."""
    owner, refused, same_job = None, None, False
    if distributed.is_main():
        try:
            owner = rundir.claim(run_dir, continuing=bool(cfg.resume), job=job)
            same_job = owner.same_job  # submitit requeued this very job: it continues here
        except rundir.RunDirRefused as e:
            refused = str(e)
    refused, same_job = distributed.broadcast_object((refused, same_job))
    if refused:
        if single:
            raise SystemExit(f"rlhf-train: {refused}")
        raise rundir.RunDirRefused(refused)  # a job of a sweep: failed, and reported with the others
    return owner, same_job


def resume_from(cfg: DictConfig, run_dir: Path, same_job: bool) -> list[Path] | None:
    """The run's complete checkpoints, oldest first (the newest that loads is used), when it
    continues: resume=, or submitit's requeue (before its first checkpoint: from the start)."""
    if not (cfg.resume or same_job):
        return None
    resume = checkpoint.complete(run_dir) or None
    if resume is None and cfg.resume:
        raise SystemExit(f"rlhf-train: resume={cfg.resume}: no complete checkpoint in {run_dir}")
    if resume is None and distributed.is_main():
        (run_dir / rundir.METRICS).unlink(missing_ok=True)
    return resume


def run(cfg: DictConfig, info: RunInfo, plugins, resume: list[Path] | None, stop, owner, single: bool,
        same_job: bool) -> dict:
    """Build the trainer and fit; a run that fails says so in one line where it can (a refused
    input, a full disk), and writes its traceback to error.txt otherwise."""
    from rlhf.core.loop.trainer import Trainer

    run_dir, hc = Path(info.run_dir), HydraConfig.get()
    trainer = None

    def started() -> None:  # .hydra/: the config this run trains with, once it has loaded
        if distributed.is_main():
            if resume:  # the checkpoint really loaded, and what a forced resume changed
                print(f"{'requeued: ' if same_job else ''}{trainer.resume_line()}", flush=True)
            rundir.write_record(run_dir, cfg, HydraConfig.instance().cfg, hc.overrides.task)

    if not resume and not single:
        started()  # a new job of a sweep: at once, so that the sweep's report lists it however it ends
    share_cores(cfg.threads)
    try:
        # a resumed run records its config only once its checkpoint has loaded: a resume that
        # fails leaves the run's record as it was; a data file or model that cannot be used: one line
        with refused_in_one_line(run_dir, owner) if single else contextlib.nullcontext():
            trainer = Trainer(cfg, run_dir, info, plugins)
        return trainer.fit(resume=resume, preemption=stop, started=started if resume or single else None,
                           progress_bar=parallel_jobs() <= 1)  # jobs side by side: a line each, not bars over each other
    except (Requeued, Interrupted, hydra_setup.Refusal):
        raise
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        last = checkpoint.complete(run_dir)
        where = (f"the last checkpoint is {last[-1].name}; continue with:\n  rlhf-train resume={run_dir}" if last
                 else "no checkpoint was written, nothing to resume")
        print(f"\nstopped at once: {where}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except SystemExit as e:  # a plugin's sys.exit(): a failed job, not the end of the sweep
        try:
            raise RuntimeError(f"the run called sys.exit({e.code!r})") from e
        except RuntimeError as err:
            failed(err, run_dir, single)
            raise
    except Refused as e:  # a checkpoint that does not fit, none that loads: the run is left as it was
        if single:
            raise hydra_setup.refusal(e) from None
        raise
    except Exception as e:
        failed(e, run_dir, single)
        raise


def failed(e: Exception, run_dir: Path, single: bool) -> None:
    """A run that raised: on a full disk, one line saying what to do; else the traceback into
    the job's log and error.txt, so a failed job of a sweep can be read after the others end."""
    full = disk_full(e)
    if full is not None:  # nothing more can be written there
        last = checkpoint.complete(run_dir)
        message = (f"no space left on the device holding {full or run_dir}: free some (df -h {run_dir}), then continue with "
                   f"`rlhf-train resume={run_dir}`" + (f" from {last[-1].name}" if last else " (no checkpoint completed)"))
        if single:
            raise SystemExit(f"rlhf-train: {message}") from None
        raise RuntimeError(message) from e
    if isinstance(e, OneLine):  # the message says it all (a NaN reward): one line, and error.txt
        if distributed.is_main():
            save_error(run_dir, f"{type(e).__name__}: {e}\n")
        if single:
            raise hydra_setup.refusal(e) from None
        log.error("run failed: %s", e)
        return
    if single:  # the traceback once (a plugin's bug needs its frames), then where it is kept
        text = traceback.format_exc()
        print(text, file=sys.stderr, end="", flush=True)
        if distributed.is_main():
            save_error(run_dir, text)
        raise SystemExit(f"rlhf-train: the run failed: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                         f"(the traceback is above and in {run_dir / rundir.ERROR})") from None
    log.exception("run failed")
    if distributed.is_main():
        save_error(run_dir, traceback.format_exc())


def report(s: dict, run_dir: Path) -> None:
    """The end of a run, as the README shows it."""
    print(f"held-out reward   {s['reward_start']:.3f} -> {s['reward_end']:.3f}")
    print(f"KL to reference   {s['kl_start']:.3f} -> {s['kl_end']:.3f} nats")
    for key in ["accuracy", *sorted((k.removesuffix("_end") for k in s if k.startswith("pass@") and k.endswith("_end")),
                                    key=lambda k: int(k[5:]))]:
        if f"{key}_end" in s and key != "pass@1":  # (eval.pass_at_k: pass@1 is the accuracy)
            print(f"{key:<17} {s[f'{key}_start']:.3f} -> {s[f'{key}_end']:.3f}")
    print(f"run directory     {s['run_dir']}  ({s['wall_s']:.0f} s)")
    if (run_dir / rundir.OPTIMUM).is_file():  # eval.kl_to_optimum: the trained policy beside pi_ref and pi*
        from rlhf.core.evaluation.optimum import format_table

        print(format_table(rundir.from_json((run_dir / rundir.OPTIMUM).read_text())))


def submitit_job_id() -> str | None:
    """This submitit job's id (the same when the job is requeued), or None outside one."""
    try:
        from submitit import JobEnvironment

        return str(JobEnvironment().job_id)
    except Exception:
        return None


def share_cores(threads: int) -> None:
    """torch's threads: as set, the cores a submitit job was given, or this machine's cores
    shared among the processes running on it (a parallel sweep's jobs, data-parallel ranks)."""
    import torch

    sharing = parallel_jobs() * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    granted = HydraConfig.get().launcher.get("cpus_per_task") if under_submitit() else None
    if threads > 0:
        torch.set_num_threads(threads)
    elif granted:
        torch.set_num_threads(int(granted))
    elif sharing > 1:  # do not oversubscribe the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // sharing))


def disk_full(e: BaseException) -> str | None:
    """The file being written when the disk filled up, if that is what `e` (or its cause) is."""
    import errno

    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e.filename or "")
        if "No space left on device" in str(e):  # safetensors' SafetensorError is no OSError
            return ""
        e = e.__cause__ or e.__context__
    return None


def save_error(run_dir: Path, text: str) -> None:
    """error.txt, or, when it cannot be written (a full disk), why not, on stderr."""
    try:
        rundir.write_atomic(run_dir / rundir.ERROR, text)
    except OSError as e:
        print(f"rlhf-train: could not write {run_dir / rundir.ERROR} ({e.strerror}); the traceback is above",
              file=sys.stderr, flush=True)


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
    flags, new = _split_flags(new)
    recorded = OmegaConf.load(run_dir / rundir.CONFIG)
    config_dir, config_name = composed_from(run_dir, flags)
    try:
        prospective = schema.compose([*before, *[a for a in new if not a.startswith("hydra.")]], config_name, config_dir)
    except (Exception, SystemExit) as e:
        raise SystemExit(f"rlhf-train: resume={run_dir}: the overrides do not compose: {' '.join(str(e).split())}") from None
    changes = rundir.resume_changes(OmegaConf.to_container(recorded), OmegaConf.to_container(prospective))
    shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changes.items())[:12])
    never = [k for k in changes if k.startswith(rundir.RESUME_NEVER)]
    if changes and not prospective.resume_force:
        raise SystemExit(
            f"rlhf-train: resume={run_dir} refused: these settings change what a step computes, so the run would "
            f"not continue the one it resumes: {shown}{' ...' if len(changes) > 12 else ''}. "
            + (f"Start a new run (it may go on from this one: policy.path={run_dir}); {', '.join(never)} cannot change "
               "on a resume, not even with resume_force=true." if never else
               "Start a new run, or add resume_force=true to continue with them in effect from the step after the checkpoint.")
        )
    if never:
        raise SystemExit(
            f"rlhf-train: resume={run_dir} refused: {', '.join(never)} {'say' if len(never) > 1 else 'says'} what its "
            "checkpoint holds (another "
            f"optimizer's state, adapters for another model), so not even resume_force=true continues it with "
            f"{'them' if len(never) > 1 else 'it'} changed; start a new run from it: rlhf-train policy.path={run_dir} ..."
        )
    if changes:  # (the run says from which step they are in effect once its checkpoint has loaded)
        log.warning("resuming with changed settings (resume_force=true): %s", ", ".join(changes))
    # the run's own overrides, then the new ones; its directory; one run even if a preset sweeps
    # quoted: a sweep job's directory is named by its overrides (optimizer.beta=0.1,seed=1)
    files = [*(["--config-dir", config_dir] if config_dir else []), *(["--config-name", config_name] if config_name != "config"
                                                                       else [])]
    return [argv[0], *files, *before, *new, f"resume={_quoted(run_dir)}", f"hydra.run.dir={_quoted(run_dir)}",
            "hydra.mode=RUN"]


def _split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(`--config-dir=D`-style flags, overrides) of a resume's arguments."""
    short = {"-cd": "--config-dir", "-cn": "--config-name"}
    flags, overrides, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and "=" not in a and i + 1 < len(args):
            flags.append(f"{short.get(a, a)}={args[i + 1]}")
            i += 2
            continue
        (flags if a.startswith("-") else overrides).append(a)
        i += 1
    return flags, overrides


def composed_from(run_dir: Path, flags: list[str]) -> tuple[str | None, str]:
    """The `--config-dir` and `--config-name` a run was composed with (its .hydra/hydra.yaml), or
    those given again now; one that is gone is refused in one line."""
    from omegaconf import OmegaConf

    given = {f.split("=", 1)[0]: f.split("=", 1)[1] for f in flags if "=" in f}
    unknown = [f for f in flags if f.split("=", 1)[0] not in ("--config-dir", "--config-name")]
    if unknown or len(given) != len(flags):
        raise SystemExit(f"rlhf-train: resume= takes overrides and --config-dir=<dir>, --config-name=<name>; not {flags[0]}")
    try:
        hc = OmegaConf.load(run_dir / rundir.HYDRA / "hydra.yaml").hydra
        dirs = [s.path for s in hc.runtime.config_sources if s.provider == "command-line" and s.schema == "file"]
        name = str(hc.job.config_name)
    except (OSError, AttributeError, ValueError):
        dirs, name = [], "config"
    config_dir = given.get("--config-dir") or (dirs[0] if dirs else None)
    if config_dir and not Path(config_dir).is_dir():
        raise SystemExit(f"rlhf-train: resume={run_dir}: the run was composed with --config-dir {config_dir}, which is not "
                         "a directory any more; restore it, or give the one that holds its files: "
                         f"rlhf-train resume={run_dir} --config-dir=<dir>")
    return config_dir, given.get("--config-name", name)


def _quoted(path: Path) -> str:
    """A value in Hydra's override grammar that may hold '=', ',' and brackets."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


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
        extra.append("hydra.run.dir=" + distributed.broadcast_object(f"outputs/{now:%Y-%m-%d}/{now:%H-%M-%S}-{os.getpid()}"))
    if not distributed.is_main():
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return [*argv, *extra]


def main() -> None:
    hydra_setup.prepare(remember=False)
    argv = data_parallel_argv(resume_argv(sys.argv))
    safety.remember_command_line(argv[1:])  # what resume and torchrun add is the user's command too
    sys.argv = argv
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
