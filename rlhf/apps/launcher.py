"""`hydra/launcher=joblib` for rlhf-train: joblib runs the jobs, each in a process of its own.

Hydra's joblib launcher runs jobs inside loky's worker processes. When the kernel kills one
(the out-of-memory killer sends SIGKILL), loky declares the whole pool broken: the job
running beside it is killed and listed as failed, and the jobs not yet started never run.
Here joblib dispatches the jobs from threads (`n_jobs` at a time, as before), and every job
is a process of its own that runs exactly what Hydra's joblib worker runs (the job's own
config, Hydra's `run_job`, the same run directory). The job processes are forked from a fork
server that has imported torch, transformers and peft once (`apps/forkserver.py`: ~5 s saved
a job), or, where there is none, started fresh. A job that dies is one failed job: the
others run to the end, its directory gets an error.txt naming the signal, and the sweep's
report counts every job. Ctrl-C or SIGTERM reaching the sweep is passed to every running job
once (each finishes its step, writes a checkpoint and stops) and no further job starts; the
jobs run in sessions of their own, so a terminal's Ctrl-C reaches them only through here.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Sequence

from rlhf.apps import forkserver

log = logging.getLogger(__name__)


class JobDied(RuntimeError):
    """A job's process ended without reporting back (a signal, or an exit of its own)."""


class _Jobs:
    """The running job processes: a signal to the sweep is passed on to them, once."""

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen | forkserver.Forked] = set()
        self.server: forkserver.ForkServer | None = None
        self.stopping: int | None = None
        self.lock = threading.RLock()  # with n_jobs=1 a signal can arrive in the thread that holds it

    def forward(self, signum: int, frame: Any) -> None:
        with self.lock:
            first, self.stopping = self.stopping is None, signum
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signum)
        if first:
            print(f"\n{signal.Signals(signum).name}: each running job finishes its step, writes a checkpoint and stops; "
                  "no further job starts", file=sys.stderr, flush=True)


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, filter_overrides, setup_globals
    from joblib import Parallel, delayed

    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    n_jobs = launcher.joblib.get("n_jobs") or -1
    n_jobs = (os.cpu_count() or 1) if n_jobs < 0 else n_jobs
    log.info(f"joblib is launching {len(job_overrides)} jobs, {n_jobs} at a time, each in a process of its own; "
             f"sweep output dir: {sweep_dir}")
    for idx, overrides in enumerate(job_overrides):
        log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")
    state = cloudpickle.dumps((launcher.hydra_context, launcher.config, launcher.task_function, Singleton.get_state()))
    with tempfile.TemporaryDirectory(prefix=".jobs-", dir=sweep_dir) as work:
        shared = Path(work) / "launch.pkl"
        shared.write_bytes(state)
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        running = _Jobs()
        try:
            running.server = forkserver.ForkServer().start()
        except forkserver.ForkServerError as e:
            log.info(f"each job starts as a fresh Python process ({e})")
        previous = {sig: signal.signal(sig, running.forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return Parallel(n_jobs=n_jobs, backend="threading")(
                delayed(_run)(launcher, idx, overrides, shared, Path(work), running) for idx, overrides in jobs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if running.server is not None:
                running.server.close()


def _run(launcher: Any, idx: int, overrides: list[str], shared: Path, work: Path, running: _Jobs):
    """One job in a child process; its JobReturn, or a failed one naming how it ended."""
    from hydra.core.utils import JobReturn, JobStatus

    result = work / f"{idx}.result"
    with running.lock:
        proc = None if running.stopping else _start(running, [str(shared), str(idx), str(result), *overrides])
        if proc is not None:
            running.procs.add(proc)
    code = proc.wait() if proc is not None else None
    if result.is_file():
        with open(result, "rb") as f:
            return pickle.load(f)
    if code is None:
        how = f"not started: the sweep was stopped by {signal.Signals(running.stopping).name}"
    elif code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        how = (f"stopped by {signal.Signals(code - 128).name}; `rlhf-train resume=<its directory>` continues it "
               "from its checkpoint")
    elif code < 0:
        how = f"killed by {signal.Signals(-code).name}" + (
            " (SIGKILL is what the out-of-memory killer sends)" if code == -signal.SIGKILL else "")
    else:
        how = f"exited with status {code} before reporting"
    error = JobDied(f"job {idx} ({' '.join(overrides)}): {how}")
    job_dir = _job_dir(launcher, idx, overrides)
    if job_dir is not None:  # the sweep's report reads it (and counts the job, record or not)
        from rlhf.core.run import rundir

        try:  # only into a directory no live process owns
            owner = rundir.RunLock(job_dir / rundir.LOCK, f"run directory {job_dir}").acquire()
        except rundir.RunDirBusy:
            owner = None
        if owner is not None:
            rundir.write_atomic(job_dir / rundir.ERROR, f"{error}\n")
            owner.release()
    ret = JobReturn()
    ret.overrides, ret.status, ret.return_value = overrides, JobStatus.FAILED, error
    return ret


def _start(running: _Jobs, argv: list[str]) -> subprocess.Popen | forkserver.Forked:
    """The job's process, in a session of its own (a terminal's Ctrl-C reaches it once,
    through running.forward): forked from the server, or a fresh `python -m`."""
    if running.server is not None:
        try:
            return running.server.spawn("rlhf.apps.launcher:_main", [argv], argv=[__file__, *argv], env=dict(os.environ),
                                        new_session=True)
        except forkserver.ForkServerError as e:
            log.warning(f"{e}; the remaining jobs start as fresh Python processes")
            running.server = None
    return subprocess.Popen([sys.executable, "-m", "rlhf.apps.launcher", *argv], start_new_session=True)


def _job_dir(launcher: Any, idx: int, overrides: list[str]) -> Path | None:
    """Where a job writes: its sweep directory and subdir, as Hydra resolves them for it."""
    from omegaconf import open_dict

    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id, cfg.hydra.job.num = f"{cfg.hydra.job.name}_{idx}", idx
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
    except Exception:
        return None


def _child(shared: str, idx: str, result: str, overrides: list[str]) -> None:
    """In the job's own process: what Hydra's joblib worker does, then the JobReturn, to a file."""
    import cloudpickle
    from hydra_plugins.hydra_joblib_launcher._core import execute_job

    from rlhf.apps import hydra_setup

    hydra_setup.prepare()  # as in the command that started the sweep
    hydra_context, config, task_function, singleton_state = cloudpickle.loads(Path(shared).read_bytes())
    ret = execute_job(int(idx), overrides, hydra_context, config, task_function, singleton_state)
    try:
        data = cloudpickle.dumps(ret)
    except Exception:  # an exception that does not pickle: its text does
        ret.return_value = RuntimeError(repr(ret.return_value))
        data = cloudpickle.dumps(ret)
    tmp = Path(result + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, result)


def _main(argv: list[str]) -> None:
    _child(argv[0], argv[1], argv[2], argv[3:])


if __name__ == "__main__":
    _main(sys.argv[1:])
