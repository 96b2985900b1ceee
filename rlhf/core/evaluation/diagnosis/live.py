"""The same checks during training: at each evaluation every new finding once
(`LiveDiagnosis`), and at the step it happens a sustained negative KL estimate
(`NegativeKLWatch`, which needs no evaluation)."""

from __future__ import annotations

from typing import Any

from rlhf.core.evaluation.diagnosis.findings import NEGATIVE_KL_STEPS, diagnose, kl_bias_causes
from rlhf.core.evaluation.diagnosis.record import Finding, Knob, Record


class LiveDiagnosis:
    """The same checks during training: at each evaluation, every new pathology once."""

    def __init__(self, config: dict[str, Any]):
        self.record = Record([], config)
        self.said: set[str] = set()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.record.rows.append({"step": step, **metrics})

    def check(self, samples: list[dict[str, Any]] | None = None, step: int | None = None) -> list[Finding]:
        if samples and step is not None:
            self.record.samples[step] = samples
        try:
            found = diagnose(self.record)
        except Exception as e:  # a diagnosis never stops the training it watches
            if "diagnosis" in self.said:
                return []
            found = [Finding("diagnosis", f"the live checks failed ({type(e).__name__}: {e}) and are off for this run",
                             (Knob(None, "rlhf-diagnose <run> after training"),))]
        new = [f for f in found if f.name not in self.said]
        self.said.update(f.name for f in new)
        return new


class NegativeKLWatch:
    """Warns once, at the step it happens, when the per-batch KL estimate has been negative for
    NEGATIVE_KL_STEPS steps in a row (the rule of `biased_kl`, which needs an evaluation): the
    samples are then not draws of pi at the sampling temperature, and the KL penalty is biased."""

    def __init__(self, sampler: Any, drawn_by_policy: bool = True):
        self.sampler, self.streak, self.warned = sampler, 0, False
        self.watching = drawn_by_policy  # a proposal's samples are not pi's: their KL estimate may be negative

    def update(self, kl: float | None) -> None:
        import warnings

        if kl is None or not self.watching:
            return
        self.streak = self.streak + 1 if kl < 0 else 0
        if self.streak >= NEGATIVE_KL_STEPS and not self.warned:
            self.warned = True
            causes = kl_bias_causes(self.sampler)
            warnings.warn(
                f"train/kl has been negative for {self.streak} steps in a row (last {kl:.3f} nats): responses are not "
                "samples of pi at the sampling temperature, so the KL estimate and penalty are biased. "
                + (f"Settings that cause it: {', '.join(causes)}." if causes else
                   "None of the sampler's own settings does this: check a custom sampler or generation settings."),
                stacklevel=2,
            )
