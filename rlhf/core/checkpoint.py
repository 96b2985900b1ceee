"""Checkpoints: what a run needs to continue bit for bit, written so a crash never leaves
one that could be loaded half-written.

    <run>/checkpoints/step_000040/
        trainable.safetensors   adapters (or all weights) and the value head
        state.pt                optimizer, scheduler, RNG states, data position, plugin state,
                                counters: plain tensors and Python values, read back with
                                torch.load(weights_only=True), which refuses anything else
        checkpoint.json         written last: the step and every file's size

A checkpoint is written into `.partial-step_...`, flushed to disk, then renamed: a crash
leaves at most a `.partial-` directory, which is never loaded. Loading also checks the
listed sizes, so a directory damaged later is passed over for the previous complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from rlhf.core.rundir import CHECKPOINTS as DIR

MANIFEST = "checkpoint.json"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` complete ones."""
    from safetensors.torch import save_file

    root = Path(run_dir) / DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".partial-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    files = {name: (tmp / name).stat().st_size for name in (WEIGHTS, STATE)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    for name in (WEIGHTS, STATE, MANIFEST):
        _fsync(tmp / name)
    if final.exists():  # the same step again, after a resume from an earlier checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete(run_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(path: Path) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return all((path / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; `.partial-` directories never count."""
    root = Path(run_dir) / DIR
    if not root.is_dir():
        return []
    found = sorted(p for p in root.glob("step_*") if p.is_dir())
    damaged = [p for p in found if not is_complete(p)]
    for p in damaged:
        warnings.warn(f"checkpoint {p} is incomplete or damaged (sizes differ from {MANIFEST}); it is skipped", stacklevel=2)
    return [p for p in found if p not in damaged]


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable tensors, state) of a checkpoint. Only tensors and plain values are read:
    a pickle that would run code is refused by torch's weights-only loader."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / WEIGHTS))
    try:
        state = torch.load(path / STATE, weights_only=True)
    except Exception as e:  # UnpicklingError for a foreign object
        raise ValueError(
            f"{path / STATE} holds something other than tensors and plain values, and is refused "
            f"(torch.load(weights_only=True): {str(e).splitlines()[0]}). Checkpoints written by rlhf never do; "
            "was the file replaced?"
        ) from e
    return tensors, state


def rng_state() -> dict[str, Any]:
    """Every random number generator the run draws from."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
