"""Diagnoses of a run from what it logged: each finding names the pathology, the evidence
(the metrics and steps that show it, a sample where it helps) and the knobs that address it.

Read by `rlhf-diagnose` (a run or a sweep, after the fact), by the training loop (the same
checks at each evaluation, each finding warned once) and by `rlhf-compare`'s report. A
detector sees the metrics rows logged so far (`metrics.jsonl`), the run's config and its
saved samples; it returns a Finding or None. Every threshold is a named constant of `findings` with the
reason for its value; they were set on the planted-pathology benchmark
(`benchmarks/diagnose.py`), whose confusion table is in the documentation.

The detectors here read what the core logs (evaluations, train/reward and train/kl, the
gradient norm, the entropy); a plugin owns the detectors over the metrics only it emits (a
class attribute `detectors`, found through the registry by the run's `_target_`, never
imported here: PPO's trust region, DPO's displacement) and says whether its updates were
tiny (`tiny_steps`). A finding's knobs are settings (`Knob`): only those the run's config
has are suggested, so every override it prints composes for that optimizer.

    record     the run's record, a finding and its knobs, the helpers every detector uses
    findings   the core's detectors and their thresholds; `diagnose`
    live       the same checks during training
"""

from rlhf.core.evaluation.diagnosis.findings import ABOUT_THE_OBJECTIVE, DETECTORS, STEP_KNOBS, diagnose  # noqa: F401
from rlhf.core.evaluation.diagnosis.live import LiveDiagnosis, NegativeKLWatch  # noqa: F401
from rlhf.core.evaluation.diagnosis.record import (  # noqa: F401
    MIN_TRAIN_ROWS,
    Finding,
    Knob,
    Record,
    fmt,
    load,
    median_tail,
    span,
    time_bound,
    top_sample,
)
