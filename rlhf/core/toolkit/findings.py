"""What a plugin's own diagnoses are made of (an optimizer's `detectors` and `tiny_steps`):
the run's record, a finding with its evidence and knobs, and the helpers the core's own
detectors use (rlhf.core.evaluation.diagnosis)."""

from rlhf.core.evaluation.diagnosis import (  # noqa: F401 (the toolkit's names)
    MIN_TRAIN_ROWS,
    STEP_KNOBS,
    Finding,
    Knob,
    Record,
    fmt,
    median_tail,
    span,
    top_sample,
)
