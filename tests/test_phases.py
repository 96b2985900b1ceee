"""Where a step's time goes (rlhf/core/loop/phases.py): every phase of every step in the run's
rows, within the step's own time; totals and shares in the summary; rlhf-diagnose says what
bounds the run."""

from __future__ import annotations

import json

from conftest import compose

from rlhf.core.evaluation.diagnosis import Record, time_bound
from rlhf.core.loop.phases import Clock
from rlhf.core.loop.trainer import Trainer


def test_every_phase_of_a_step_is_timed_within_the_step(tmp_path):
    t = Trainer(compose("train.steps=2", "train.batch_size=4", "data.n_eval=4", "eval.every=2", "sampler.max_new_tokens=6",
                        "checkpoint.every=1"), tmp_path)
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/reward" in r]
    for r in steps:
        phases = {k: v for k, v in r.items() if k.startswith("time/") and k != "time/step_s"}
        assert {"time/sampling_s", "time/reference_s", "time/scoring_s", "time/update_s"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
        own = sum(v for k, v in phases.items() if k != "time/checkpoint_s")  # (a checkpoint's is the step before's)
        assert own <= r["time/step_s"] + 1e-6
    assert "time/checkpoint_s" in steps[1]  # step 1's checkpoint, in step 2's row
    assert all("time/evaluation_s" in r for r in rows if "eval/reward" in r)
    s = json.loads((tmp_path / "summary.json").read_text())
    shares = [v for k, v in s.items() if k.startswith("time_") and k.endswith("_share")]
    assert s["time_update_s"] > 0 and 0 < sum(shares) <= 1.0


def test_a_phase_inside_another_counts_to_the_outer_one():
    clock = Clock()
    with clock.phase("evaluation"):
        with clock.phase("sampling"):
            pass
    assert set(clock.take()) == {"time/evaluation_s"} and clock.take() == {}


def test_what_bounds_a_run_is_the_phase_with_the_largest_share():
    rows = [{"step": 1, "time/sampling_s": 3.0, "time/update_s": 1.0, "time/step_s": 4.0},
            {"step": 2, "time/sampling_s": 3.0, "time/update_s": 1.0, "time/evaluation_s": 2.0, "time/step_s": 4.0}]
    bound, shares = time_bound(Record(rows))
    assert bound == "sampling" and shares["sampling"] == 0.6 and shares["evaluation"] == 0.2
    assert time_bound(Record([{"step": 1, "eval/reward": 0.5}])) is None
