"""What a sweep ends with: which runs completed, which failed and where their tracebacks
are, and (when asked, as `+experiment=frontier` does) `rlhf-compare` on the sweep.

Hydra stops calling callbacks when a job fails, so the callback only notes the sweep
directory when the sweep starts, and `rlhf-train` reports after Hydra returns or exits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from rlhf.core import rundir

_sweep: dict[str, Any] = {}


class SweepCallback(Callback):
    def __init__(self, compare: bool = False):
        self.compare = compare  # run rlhf-compare on the sweep directory at the end

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        _sweep.update(dir=Path(config.hydra.sweep.dir), compare=self.compare)


def report() -> int:
    """Print the sweep's outcome (if a sweep ran in this process); return how many runs failed."""
    if "dir" not in _sweep:
        return 0
    root: Path = _sweep.pop("dir")
    if not root.is_dir():  # the sweep ended before any job started
        return 0
    # a job's directory has its record, or (a job killed before it wrote one) the launcher's error.txt
    jobs = sorted((d for d in root.iterdir() if d.is_dir() and ((d / rundir.HYDRA).is_dir() or (d / rundir.ERROR).is_file())),
                  key=lambda d: (len(d.name), d.name))
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

        compare([root])
    return len(failed)


def _completed(run: Path) -> bool:
    """A run that wrote its whole summary (summary.json is written atomically; one that does
    not read is not trusted)."""
    import json

    try:
        return isinstance(json.loads((run / rundir.SUMMARY).read_text()), dict)
    except (OSError, ValueError):
        return False
