"""What a sweep starts and ends with, and the jobs of `hydra/sweeper=grids`.

- Before the first job (`Prepare`): the project's own commands that make what the jobs
  read, such as `rlhf-make-pairs` and `rlhf-train-rm` for `+experiment=dpo_paper`.
- At the end: which runs completed, which failed and where their tracebacks are, and (when
  asked, as `+experiment=frontier` does) `rlhf-compare` on the sweep. Hydra stops calling
  callbacks when a job fails, so the callback only notes the sweep directory when the sweep
  starts, and `rlhf-train` reports after Hydra returns or exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from rlhf.core import rundir

_sweep: dict[str, Any] = {}


class SweepCallback(Callback):
    def __init__(self, compare: bool = False, metric: str = "eval/reward"):
        self.compare = compare  # run rlhf-compare on the sweep directory at the end
        self.metric = metric  # the frontier's reward axis in that comparison (a judge: eval/judge/<name>)

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        _sweep.update(dir=Path(config.hydra.sweep.dir), compare=self.compare, metric=self.metric)


# the commands a sweep may run before its jobs: the project's own, each by its module
COMMANDS = {"rlhf-make-pairs": "rlhf.apps.make_pairs", "rlhf-train-rm": "rlhf.apps.train_rm"}


class Prepare(Callback):
    """Before the first job: each named command (a list: the command, then its overrides) runs
    to the end in a process of its own, in order; one that fails stops the sweep before any job
    starts, naming the command and its log. Only the project's commands (COMMANDS) are run.
    `{sweep_dir}` in an override is the sweep's directory (Hydra's `${hydra:sweep.dir}` cannot
    be resolved yet when callbacks are made). Named, so that one is replaced from the command
    line: `hydra.callbacks.prepare.commands.pairs=[rlhf-make-pairs,"data.n_train=100"]`."""

    def __init__(self, commands: dict | None = None):
        self.commands = {name: list(map(str, c or [])) for name, c in (commands or {}).items()}
        for name, c in self.commands.items():
            if not c or c[0] not in COMMANDS:
                raise ValueError(f"hydra.callbacks.prepare.commands.{name}: {c[:1]} is not a command a sweep runs; "
                                 f"one of {', '.join(COMMANDS)}, then its overrides")

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        import subprocess
        import sys
        import time

        root = Path(config.hydra.sweep.dir)
        root.mkdir(parents=True, exist_ok=True)
        for name, (command, *overrides) in self.commands.items():
            overrides = [o.replace("{sweep_dir}", str(root)) for o in overrides]
            log = root / f"{name}.log"
            print(f"before the jobs: {command} {' '.join(overrides)}  (log: {log})", flush=True)
            t0 = time.time()
            with open(log, "w") as out:
                code = subprocess.run([sys.executable, "-m", COMMANDS[command], *overrides], stdout=out,
                                      stderr=subprocess.STDOUT).returncode
            if code != 0:
                tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
                raise RuntimeError(f"{command} failed (exit status {code}) before the sweep's jobs; its log: {log}\n{tail}")
            print(f"  done in {time.time() - t0:.0f} s", flush=True)


def grid_jobs(grids: dict, common: list, parse, product) -> list[list[str]]:
    """The jobs of a union of grids: each grid's own overrides (key: value or comma-separated
    sweep) with the common ones (the sweeper's params and the command line's arguments, already
    parsed). A common key that some grid sets replaces that grid's value, in those grids only
    (`optimizer.beta=0.1` narrows the beta sweeps and adds no beta to a grid without one); a key
    no grid sets goes to every grid. `product` makes one grid's job list."""
    own = {name: parse([f"{k}={v}" for k, v in (grid or {}).items()]) for name, grid in grids.items()}
    set_by_grids = {o.get_key_element() for overrides in own.values() for o in overrides}
    jobs = []
    for name, overrides in own.items():
        keys = {o.get_key_element() for o in overrides}
        replaced = {o.get_key_element(): o for o in common if o.get_key_element() in keys}
        shared = [o for o in common if o.get_key_element() not in set_by_grids]
        jobs += product([replaced.get(o.get_key_element(), o) for o in overrides] + shared)
    return jobs


def report() -> int:
    """Print the sweep's outcome (if a sweep ran in this process); return how many runs failed."""
    if "dir" not in _sweep:
        return 0
    root: Path = _sweep.pop("dir")
    if not root.is_dir():  # the sweep ended before any job started
        return 0
    # a job's directory has its record, or (a job killed before it wrote one) the launcher's error.txt
    jobs = sorted((d for d in root.iterdir() if d.is_dir() and not rundir.is_reward_model(d)
                   and ((d / rundir.HYDRA).is_dir() or (d / rundir.ERROR).is_file())), key=lambda d: (len(d.name), d.name))
    done = [d for d in jobs if _completed(d)]
    failed = [d for d in jobs if d not in done]
    print(f"sweep {root}: {len(jobs)} runs, {len(done)} completed, {len(failed)} failed")
    for d in failed:
        overrides = (d / rundir.OVERRIDES).read_text().replace("\n- ", " ").lstrip("- ").strip() \
            if (d / rundir.OVERRIDES).is_file() else "(no record)"
        error = d / rundir.ERROR
        last = error.read_text().strip().splitlines()[-1] if error.is_file() and error.read_text().strip() else ""
        print(f"  FAILED {d.name}: {overrides}" + (f"\n         {last}" if last else "")
              + f"\n         traceback: {error if error.is_file() else d} (and the job's log in {d})")
    if _sweep.pop("compare", False) and done:
        from rlhf.apps.compare import compare

        compare([root], metric=_sweep.pop("metric", "eval/reward"))
    return len(failed)


def _completed(run: Path) -> bool:
    """A run that wrote its whole summary (summary.json is written atomically; one that does
    not read is not trusted)."""
    import json

    try:
        return isinstance(json.loads((run / rundir.SUMMARY).read_text()), dict)
    except (OSError, ValueError):
        return False
