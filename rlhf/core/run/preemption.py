"""Ending a run early without losing it: preemption and time limits under submitit, and
Ctrl-C or SIGTERM everywhere else. Either way the run stops at the end of the step it is in,
writes a checkpoint, and says how to continue.

Preemption and time limits under submitit (hydra-submitit-launcher).

Before a job's time limit (or when the cluster preempts it) submitit sends a signal (USR2
unless SUBMITIT_PREEMPT_SIGNAL says otherwise) whose handler requeues the job and exits at
once, mid-step, losing everything since the last checkpoint. `Preemption` puts its own
handler in front: the signal only raises a flag, the trainer finishes the step it is in,
writes a checkpoint, and then hands over to submitit's handler, which requeues. The
requeued job runs the same sweep job in the same run directory and resumes from the
checkpoint there (rlhf-train does that).

Ctrl-C (SIGINT) and SIGTERM (what `kill`, Docker and most schedulers send): `Interrupt`
turns the first one into the same request; the run stops at the step's end with a
checkpoint and prints the command that continues it. Before training has started there is
nothing to save, and a second Ctrl-C stops at once: both raise KeyboardInterrupt.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


class Requeued(SystemExit):
    """The job was checkpointed and requeued (or told to stop): leave without calling the
    run a failure."""


class Interrupted(SystemExit):
    """The run was stopped by a signal after writing a checkpoint (exit status 128 + signal)."""


class Interrupt:
    """Ctrl-C and SIGTERM as a request to stop at the next step boundary, with a checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.armed = False  # training has started: the first signal waits for the step's end
        self._previous: dict[int, Any] = {}

    def arm(self) -> None:
        self.armed = True

    def install(self) -> Interrupt:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.armed or self.signum is not None:  # nothing to save yet, or asked twice
            self.signum = signum
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(Ctrl-C again stops at once, losing the step)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.armed and self.signum is not None

    def message(self, step: int, run_dir: Path) -> str:
        return (f"stopped by {signal.Signals(self.signum).name} after step {step}: checkpoint written to "
                f"{run_dir / 'checkpoints'}; continue with:\n  rlhf-train resume={run_dir}")

    def hand_over(self) -> None:
        raise Interrupted(128 + (self.signum or 0))


class Preemption:
    def __init__(self) -> None:
        self._received: tuple[Callable[..., Any], int, FrameType | None] | None = None
        self.installed = False

    def install(self) -> bool:
        """Defer submitit's signal handler to the next step boundary. False, and nothing
        changed, outside a submitit job."""
        if not under_submitit():
            return False
        from submitit import JobEnvironment

        sig = JobEnvironment._usr_sig()
        original = signal.getsignal(sig)
        if not callable(original):  # submitit has not installed its handler: nothing to defer
            return False

        def defer(signum: int, frame: FrameType | None) -> None:
            self._received = (original, signum, frame)

        signal.signal(sig, defer)
        self.installed = True
        return True

    @property
    def requested(self) -> bool:
        return self._received is not None

    def arm(self) -> None:
        pass  # submitit's signal is deferred from the moment it is installed

    def message(self, step: int, run_dir: Path) -> str:
        return (f"preempted: checkpoint of step {step} written to {run_dir / 'checkpoints'}; "
                "submitit requeues the job, which resumes from it")

    def hand_over(self) -> None:
        """Run submitit's handler now (after the checkpoint): it requeues the job and exits.
        It returns on ranks other than 0, which must leave too."""
        assert self._received is not None
        original, signum, frame = self._received
        try:
            original(signum, frame)
        except SystemExit as e:
            raise Requeued(e.code) from None
        raise Requeued(0)
