"""A run's life as parts: each cadence of the training loop (recording and the dashboards,
the guard against non-finite numbers, live diagnosis, the progress line, checkpoints,
preemption) is one part, called by the loop at the same points:

    for part in parts: part.begin()
    for step in steps:
        metrics = train_step()
        for part in parts: part.after_step(step, metrics)
        if an evaluation is due: last = evaluate(step); for part in parts: part.after_eval(step, last)
        for part in parts: part.end_of_step(step)
    for part in parts: part.close()

A new cadence (an engine's weight sync, another warning) is a new part; the loop
(`rlhf.core.loop.trainer.Trainer.fit`) does not change. Parts run on the ranks that do their
job: rank 0 records, warns and shows progress; every rank checks, checkpoints (sharded
checkpoints need every rank) and hands over a preemption.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import Any

from omegaconf import OmegaConf

from rlhf.contracts.errors import OneLine
from rlhf.contracts.interfaces import SampleLogger
from rlhf.contracts.metrics import LOSS, TRAIN_KL, TRAIN_REWARD
from rlhf.core.evaluation import diagnosis
from rlhf.core.loop.phases import CLOCK, phase
from rlhf.core.parallel import distributed
from rlhf.core.run import checkpoint
from rlhf.core.run.rundir import RunRecorder

Trainer = Any  # rlhf.core.loop.trainer.Trainer, which imports this module: the parts read its run's state

GUARDED = (LOSS, TRAIN_REWARD, TRAIN_KL)  # metrics that stop the run when not finite


class NonFiniteError(OneLine, FloatingPointError):
    """A loss, reward or KL became NaN or infinite; names the step and the quantity."""


class Part:
    """A cadence of the run; each hook does nothing unless the part needs it."""

    def begin(self) -> None: ...

    def after_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def after_eval(self, step: int, metrics: dict[str, float]) -> None: ...

    def end_of_step(self, step: int) -> None: ...

    def close(self) -> None: ...


class Recording(Part):
    """metrics.jsonl (the NaN itself logged, not filtered), the logger plugins, the evaluation
    samples for the loggers that show them."""

    def __init__(self, t: Trainer, resumed: dict | None):
        self.t = t
        self.recorder = RunRecorder(t.run_dir, truncate_to=resumed["metrics_offset"] if resumed is not None else None)
        self.resumed = resumed is not None

    def begin(self) -> None:
        config = OmegaConf.to_container(self.t.cfg, resolve=True)
        for lg in self.t.loggers:
            lg.start(self.t.run, config)
        if not self.resumed:
            self.after_eval(0, self.t.first)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.recorder.log(metrics, step)
        for lg in self.t.loggers:
            lg.log(metrics, step)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self.log(metrics, step)

    def after_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.log(metrics, step)
        for lg in self.t.loggers:
            if isinstance(lg, SampleLogger):
                lg.log_samples(self.t.last_samples, step)


class Guard(Part):
    """A non-finite loss, reward or KL (or a batch its source refused) stops the run at its step,
    before any weights it touched are saved."""

    def __init__(self, t: Trainer):
        self.t = t

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        bad = {k: v for k, v in metrics.items() if k.startswith(GUARDED) and not math.isfinite(v)}
        if bad or self.t.problem:
            last = checkpoint.complete(self.t.run_dir)
            raise NonFiniteError(
                f"step {step}: " + ", ".join(f"{k} = {v}" for k, v in bad.items())
                + (f" ({self.t.problem})" if self.t.problem else "") + "; stopped before any weights it touched were saved"
                + (f"; the last checkpoint is {last[-1]}" if last else ""))


class LiveWarnings(Part):
    """The diagnoses, live: at each evaluation every pathology once, when first seen; a KL
    estimate negative step after step at the step it happens."""

    def __init__(self, t: Trainer, resumed: bool):
        self.t = t
        self.live = diagnosis.LiveDiagnosis(OmegaConf.to_container(t.cfg, resolve=True))
        if resumed:  # the steps before the resume count too
            self.live.record.rows = diagnosis.load(t.run_dir).rows
        elif t.first is not None:
            self.live.log(t.first, 0)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self.live.log(metrics, step)
        self.t.kl_watch.update(metrics.get(TRAIN_KL))

    def after_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.live.log(metrics, step)
        for finding in self.live.check(self.t.last_samples, step):
            try:  # (under -W error a warning raises: a diagnosis never stops the run)
                warnings.warn(f"step {step}: {finding.text()}\n  (rlhf-diagnose {self.t.run_dir} lists every finding)",
                              stacklevel=1)
            except Exception:
                print(f"step {step}: {finding.text()}", file=sys.stderr)


class Progress(Part):
    """A progress bar with the batch's reward, KL and loss; jobs that share a terminal (a
    parallel sweep) print a line at each evaluation instead."""

    def __init__(self, t: Trainer, start: int, bar: bool):
        from tqdm import tqdm

        self.t, self.lines = t, not bar
        self.bar = tqdm(total=t.cfg.train.steps, initial=start, desc="rlhf-train", mininterval=1, dynamic_ncols=True,
                        disable=not bar)

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        shown = [k for k in metrics if k in (TRAIN_REWARD, TRAIN_KL)] + [k for k in metrics if k.startswith(LOSS)][:1]
        self.bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in shown}, refresh=False)
        self.bar.update()

    def after_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.lines:
            print(f"{self.t.run.name}: step {step}/{self.t.cfg.train.steps}, held-out reward {metrics['eval/reward']:.3f}, "
                  f"KL {metrics['eval/kl']:.3f}", flush=True)

    def close(self) -> None:
        self.bar.close()


class ProposalSync(Part):
    """After every update, the proposal learns of it: a stale proposal keeps the new weights, an
    engine receives them (its time, for an engine that reports one)."""

    def __init__(self, t: Trainer):
        self.t = t

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.t.proposal.is_policy:  # (nothing to tell)
            return
        with phase("sync"):
            synced = self.t.proposal.after_update(self.t.policy) or {}
        metrics.update(synced, **{"time/sync_s": CLOCK.take().get("time/sync_s", 0.0)})  # before Recording logs the step


class Checkpointer(Part):
    """A checkpoint every `checkpoint.every` steps, at the last step, and when a preemption or
    an interrupt is asked for (then handed over: submitit requeues, Ctrl-C exits saying how
    to resume)."""

    def __init__(self, t: Trainer, recording: Recording | None, preemption: Any, parts: list[Part]):
        self.t, self.recording, self.preemption, self.parts = t, recording, preemption, parts

    def begin(self) -> None:
        if self.preemption is not None:
            self.preemption.arm()  # from here a signal waits for the end of the step

    def end_of_step(self, step: int) -> None:
        cfg, p = self.t.cfg, self.preemption
        preempted = p is not None and distributed.any_rank(p.requested, self.t.policy.device)
        every = cfg.checkpoint.every
        if preempted or (every > 0 and step % every == 0) or step == cfg.train.steps:
            with phase("checkpoint"):  # (its seconds show in the next step's row)
                self.t.checkpoint(step, self.recording.recorder if self.recording is not None else None)
        if preempted and step < cfg.train.steps:  # at the last step the run just ends
            for part in self.parts:
                part.close()
            if distributed.is_main():
                print(p.message(step, self.t.run_dir), flush=True)
            p.hand_over()


def parts(t: Trainer, start: int, resumed: dict | None, preemption: Any, bar: bool) -> list[Part]:
    """This rank's parts, in the order the loop calls them."""
    main = distributed.is_main()
    recording = Recording(t, resumed) if main else None
    out: list[Part] = [p for p in (ProposalSync(t), recording, Guard(t)) if p is not None]
    if main:
        out += [LiveWarnings(t, resumed is not None), Progress(t, start, bar)]
    out.append(Checkpointer(t, recording, preemption, out))
    return out
