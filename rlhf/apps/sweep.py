"""What a sweep starts and ends with, and the jobs of `hydra/sweeper=grids`.

- Before the first job (`Prepare`): the project's own commands that make what the jobs
  read, such as `rlhf-make-pairs` and `rlhf-train-rm` for `+experiment=dpo_paper`.
- At the end: which runs completed, which failed and where their tracebacks are, and (when
  asked, as `+experiment=frontier` does) `rlhf-compare` on the sweep. Hydra stops calling
  callbacks when a job fails, so the callback only notes the sweep directory when the sweep
  starts, and `rlhf-train` reports after Hydra returns or exits.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from rlhf.contracts.metrics import EVAL_REWARD
from rlhf.core.run import rundir

_sweep: dict[str, Any] = {}


class SweepCallback(Callback):
    def __init__(self, compare: bool = False, metric: str = EVAL_REWARD):
        self.compare = compare  # run rlhf-compare on the sweep directory at the end
        self.metric = metric  # the frontier's reward axis in that comparison (a judge: eval/judge/<name>)

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        _sweep.update(dir=Path(config.hydra.sweep.dir), compare=self.compare, metric=self.metric)


# the commands a sweep may run before its jobs: the project's own, each by its module
COMMANDS = {"rlhf-make-pairs": "rlhf.apps.make_pairs", "rlhf-train-rm": "rlhf.apps.train_rm"}
# `python -m` would put the current directory first on the module path (a file beside a preset
# would shadow any module the command imports): the command's module is run without it
RUN_COMMAND = "import runpy, sys; del sys.path[0]; runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
OVERRIDE = re.compile(r"^(\+\+?|~)?[A-Za-z_][\w.@/-]*(=|$)")  # Hydra's key=value, +key=value, ~key


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
            flags = [a for a in c[1:] if not OVERRIDE.match(a)]
            if flags:  # a flag (--experimental-rerun, --config-dir, -cp) would act before the command checks anything
                raise ValueError(f"hydra.callbacks.prepare.commands.{name}: {flags[0]!r} is not an override (key=value); "
                                 "a prepare command takes overrides only")

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        import json
        import os
        import subprocess
        import time

        from rlhf.contracts import safety

        root = Path(config.hydra.sweep.dir)
        root.mkdir(parents=True, exist_ok=True)
        given = forwarded(list(config.hydra.overrides.task))
        for name, (command, *overrides) in self.commands.items():
            overrides = [in_sweep(o, root) for o in overrides] + given
            log = root / f"{name}.log"
            print(f"before the jobs: {command} {' '.join(overrides)}  (log: {log})", flush=True)
            t0 = time.time()
            # this callback's commands come from the project's presets or the user's command line (a config
            # file may set no callback): the child takes them as the user's, and nothing else
            line = [*safety.command_line().overrides, *overrides]
            env = {**os.environ, safety.COMMAND_LINE: json.dumps(line)}
            with open(log, "w") as out:
                code = subprocess.run([sys.executable, "-c", RUN_COMMAND, COMMANDS[command], *overrides], stdout=out,
                                      stderr=subprocess.STDOUT, env=env).returncode
            if code != 0:  # SystemExit: Hydra turns a callback's exceptions into warnings and goes on
                tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
                print(f"{command} failed (exit status {code}) before the sweep's jobs; no job started; its log: {log}\n"
                      f"{tail}", file=sys.stderr, flush=True)
                raise SystemExit(1)
            print(f"  done in {time.time() - t0:.0f} s", flush=True)


# the sweep's command-line settings the prepared inputs depend on: passed on to each command
FORWARDED = ("policy", "sampler", "data.prompts", "data.prompt_list", "data.text_field", "data.as_chat", "data.subset",
             "data.split", "device", "threads")


def forwarded(overrides: list[str]) -> list[str]:
    """The sweep's overrides of FORWARDED settings, as each prepare command takes them: pairs are
    sampled from the policy the jobs train, with their sampler and prompts. A sweep over one of
    them has no one value to pass on: refused."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if any(key == f or key.startswith(f + ".") for f in FORWARDED):
            from hydra.core.override_parser.overrides_parser import OverridesParser

            if OverridesParser.create().parse_override(o).is_sweep_override():
                print(f"{o}: a sweep over {key} has no one value for the commands that run before the jobs; "
                      "sweep it in a sweep of its own", file=sys.stderr, flush=True)
                raise SystemExit(1)
            out.append(o)
    return out


def bare_key(override) -> str:
    """A parsed override's key without its +, ++ or ~ prefix."""
    return override.get_key_element().lstrip("+~")


def in_sweep(value, root) -> str:
    """`value` with `{sweep_dir}` replaced by the sweep's directory."""
    return str(value).replace("{sweep_dir}", str(root))


def grid_jobs(grids: dict, common: list, product, has=lambda grid, key: True) -> tuple[list, dict]:
    """The jobs of a union of grids, and the common keys each grid left out.

    Each grid's own overrides (key: value or comma-separated sweep, parsed) go with the common
    ones (the sweeper's params and the command line's arguments, parsed). A common key a grid
    sets replaces that grid's value; one it does not set is added when the grid's config has
    that field (`has(grid, key)`: `train.steps` reaches every grid, `optimizer.beta` no grid
    whose optimizer has no beta; `++key` likewise) or when the override adds or deletes a key
    explicitly (`+key`, `~key`: every grid). `product` makes one grid's job list."""
    jobs, left_out = [], {}
    for name, own in grids.items():
        keys = {bare_key(o) for o in own}
        replaced = {bare_key(o): o for o in common if bare_key(o) in keys}
        added = []
        for o in common:
            if bare_key(o) in keys:
                continue
            explicit = o.get_key_element().startswith(("~", "+")) and not o.get_key_element().startswith("++")
            if explicit or has(name, bare_key(o)):
                added.append(o)
            else:
                left_out.setdefault(name, []).append(bare_key(o))
        jobs += product([replaced.get(bare_key(o), o) for o in own] + added)
    return jobs, left_out


def report(root: Path | None = None) -> int:
    """Print the outcome of the sweep in `root` (default: the one that ran in this process, if
    any); return how many runs failed."""
    if root is None and "dir" not in _sweep:
        return 0
    root = Path(root) if root is not None else _sweep.pop("dir")
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

        compare([root], metric=_sweep.pop("metric", EVAL_REWARD))
    return len(failed)


def _completed(run: Path) -> bool:
    """A run that wrote its whole summary (summary.json is written atomically; one that does
    not read is not trusted)."""
    import json

    try:
        return isinstance(json.loads((run / rundir.SUMMARY).read_text()), dict)
    except (OSError, ValueError):
        return False
