"""`rlhf-diagnose`: name what went wrong in a run, show the evidence, say which knob to turn.

    rlhf-diagnose outputs/<date>/<time>        # one run
    rlhf-diagnose multirun/<date>/<time>       # every run of a sweep
    rlhf-diagnose <dir> --json                 # the findings as JSON, a line per run

Reads what training logged (metrics.jsonl, the config, the saved samples); the checks are
those `rlhf-train` warns about live (rlhf/core/evaluation/diagnosis/). A healthy run gets "no findings".
Then what bounds the run: the phases of its steps (time/<phase>_s) by their share of the time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf.core.evaluation import diagnosis
from rlhf.core.run import rundir


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for root in paths:
        if not root.exists():
            raise SystemExit(f"rlhf-diagnose: no such directory {root}")
        found = sorted({p.parent for p in root.rglob(rundir.METRICS)} | ({root} if rundir.is_run(root) else set()),
                       key=rundir.natural_key)
        if not found:
            raise SystemExit(f"rlhf-diagnose: no run under {root} (a run directory holds {rundir.METRICS})")
        # a reward model a sweep trained before its jobs is no policy's run
        runs += [d for d in found if ((d / rundir.METRICS).is_file() or rundir.is_run(d)) and not rundir.is_reward_model(d)]
    return runs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="run directories, or sweep directories holding runs")
    p.add_argument("--json", action="store_true", help="one JSON object per run: {run, findings: [...]}")
    args = p.parse_args(argv)
    for run in find_runs([d.resolve() for d in args.dirs]):
        record = diagnosis.load(run)
        try:
            findings = diagnosis.diagnose(record) if record.rows else []
        except Exception as e:  # one run's odd record does not stop the others' diagnoses
            print(f"rlhf-diagnose: {run}: the checks failed ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        bound = diagnosis.time_bound(record)
        if args.json:
            print(rundir.to_json({"run": str(run), "findings": [f.as_dict() for f in findings],
                                  **({"time": {"bound_by": bound[0], "shares": bound[1]}} if bound else {}),
                                  **({} if record.rows else {"error": f"no {rundir.METRICS}"})}))
            continue
        print(f"{run}:")
        if not record.rows:
            print(f"  no {rundir.METRICS}: nothing to diagnose")
        elif not findings:
            print(f"  no findings ({record.last_step} of {record.total_steps} steps)")
        for f in findings:
            print("  " + f.text().replace("\n", "\n  "))
        if bound:  # what bounds the run: where its time went
            print(f"  time: bound by {bound[0]} ({', '.join(f'{k} {v:.0%}' for k, v in bound[1].items() if v >= 0.005)})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
