"""Preemption and time limits under submitit (hydra-submitit-launcher).

Before a job's time limit (or when the cluster preempts it) submitit sends a signal (USR2
unless SUBMITIT_PREEMPT_SIGNAL says otherwise) whose handler requeues the job and exits at
once, mid-step, losing everything since the last checkpoint. `Preemption` puts its own
handler in front: the signal only raises a flag, the trainer finishes the step it is in,
writes a checkpoint, and then hands over to submitit's handler, which requeues. The
requeued job runs the same sweep job in the same run directory, and `resume_point` finds
the checkpoint there.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from rlhf.core import checkpoint


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


class Requeued(SystemExit):
    """The job was checkpointed and requeued (or told to stop): leave without calling the
    run a failure."""


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


def resume_point(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a requeued submitit job's run directory, if any."""
    if not under_submitit():
        return None
    found = checkpoint.complete(run_dir)
    return found[-1] if found else None
