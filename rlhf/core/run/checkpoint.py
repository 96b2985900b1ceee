"""Checkpoints: what a run needs to continue bit for bit, written so a crash never leaves
one that could be loaded half-written.

    <run>/checkpoints/step_000040/
        trainable.safetensors   adapters (or all weights) and the value head
        shards/                 instead, under parallel=fsdp: the trained weights and the
                                optimizer's state, each rank's shards (torch.distributed.checkpoint)
        state.pt                optimizer, scheduler, RNG states, data position, plugin state,
                                counters: plain tensors and Python values, read back with
                                torch.load(weights_only=True), which refuses anything else
        checkpoint.json         written last: the step, every file's size and SHA-256

A checkpoint is written into `.partial-step_...`, flushed to disk, then renamed: a crash
leaves at most a `.partial-` directory, which is never loaded. A checkpoint counts as
complete when its files have the listed sizes, and is loaded only when their contents have
the listed hashes: one damaged later (a bad disk block, a copy cut short, a flipped byte)
is passed over, with a warning naming the file, for the previous complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.contracts.errors import Refused
from rlhf.core.parallel import distributed
from rlhf.core.run.rundir import CHECKPOINTS as DIR
from rlhf.core.run.rundir import fsync_dir

MANIFEST = "checkpoint.json"
WEIGHTS = "trainable.safetensors"
STATE = "state.pt"
SHARDS = "shards"


class DamagedCheckpoint(Refused, ValueError):
    """A checkpoint's files do not have the contents its manifest lists."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_of(path: Path) -> int:
    """The step of a checkpoint directory's name (step_000040 -> 40; any number of digits)."""
    m = re.fullmatch(r"step_(\d+)", Path(path).name)
    return int(m.group(1)) if m else -1


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int,
         shards: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` complete ones.
    With `shards` (parallel=fsdp) every rank calls this: `shards(directory)` writes each rank's
    part of the weights and optimizer state (a collective), rank 0 the rest and the manifest,
    which lists every rank's files."""
    from safetensors.torch import save_file

    root = Path(run_dir) / DIR
    final = root / f"step_{step:06d}"
    tmp = root / f".partial-{final.name}"
    main = distributed.is_main()
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    known: dict[str, tuple[int, str]] = {}  # (size, SHA-256) of the shard files, each hashed by its writer
    if shards is not None:
        distributed.barrier()  # the directory exists before any rank writes into it
        shards(tmp / SHARDS)  # returns once every rank's files are written
        mine = {f"{SHARDS}/{f.name}": (f.stat().st_size, _sha256(f))
                for f in (tmp / SHARDS).glob(f"__{distributed.rank()}_*.distcp")}
        known = {name: v for part in distributed.gather_objects(mine) for name, v in part.items()}
    if not main:
        return final
    if tensors:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    names = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
    files = {name: known[name][0] if name in known else (tmp / name).stat().st_size for name in names}
    sha256 = {name: known[name][1] if name in known else _sha256(tmp / name) for name in names}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files, "sha256": sha256}, indent=2) + "\n")
    for name in (*names, MANIFEST):
        _fsync(tmp / name)
    if shards is not None:
        fsync_dir(tmp / SHARDS)
    if final.exists():  # the same step again, after a resume from an earlier checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
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
    """Complete checkpoints of a run, oldest first (by step number, not by name: step_1000000
    comes after step_999999); `.partial-` directories never count."""
    root = Path(run_dir) / DIR
    if not root.is_dir():
        return []
    found = sorted((p for p in root.glob("step_*") if p.is_dir() and step_of(p) >= 0), key=step_of)
    damaged = [p for p in found if not is_complete(p)]
    for p in damaged:
        warnings.warn(f"checkpoint {p} is incomplete or damaged (sizes differ from {MANIFEST}); it is skipped", stacklevel=2)
    return [p for p in found if p not in damaged]


def load(path: Path, share: tuple[int, int] = (0, 1)) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable tensors, state) of a checkpoint; the tensors are {} for a sharded one (its
    weights load with rlhf.core.parallel.sharding.load). Its files must have the contents its
    manifest lists (DamagedCheckpoint otherwise, naming the file). Only tensors and plain
    values are read: a pickle that would run code is refused by torch's weights-only loader.
    `share=(rank, ranks)`: this rank checks every ranks-th shard file only, and every other
    file (the ranks must then agree on the verdict)."""
    from safetensors.torch import load_file

    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path / MANIFEST} cannot be read ({e})") from e
    shard_files = sorted(n for n in manifest.get("sha256", {}) if n.startswith(SHARDS + "/") and n.endswith(".distcp"))
    others = set(shard_files) - set(shard_files[share[0] :: share[1]])  # the other ranks' share
    for name, digest in manifest.get("sha256", {}).items():  # checkpoints written before hashes: sizes only
        if name in others:
            continue
        try:
            actual = _sha256(path / name)
        except OSError as e:  # a missing file, a bad disk block
            raise DamagedCheckpoint(f"{path / name} cannot be read ({e.strerror})") from e
        if actual != digest:
            raise DamagedCheckpoint(f"{path / name} does not have the contents {MANIFEST} lists (SHA-256 differs): "
                                    "it was damaged after it was written")
    try:
        tensors = load_file(str(path / WEIGHTS)) if (path / WEIGHTS).is_file() else {}  # {}: sharded
    except Exception as e:  # safetensors' "header too large" and the like name no file
        raise DamagedCheckpoint(f"{path / WEIGHTS} cannot be read as safetensors ({e})") from e
    try:
        state = torch.load(path / STATE, weights_only=True)
    except Exception as e:  # UnpicklingError for a foreign object
        raise ValueError(
            f"{path / STATE} holds something other than tensors and plain values, and is refused "
            f"(torch.load(weights_only=True): {str(e).splitlines()[0]}). Checkpoints written by rlhf never do; "
            "was the file replaced?"
        ) from e
    return tensors, state


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint keeps its weights as DCP shards (written under parallel=fsdp)."""
    return (Path(path) / SHARDS).is_dir()


def seed_all(seed: int) -> None:
    """Seed every random number generator the run draws from (Python's, NumPy's, torch's on
    every device): what transformers.set_seed does, without importing its trainer module,
    which costs several seconds at every start."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def with_generators_of(saved: Any, fresh: Any) -> Any:
    """`saved` (a source's state) with every random generator's state ("rng") taken from `fresh`:
    the data position kept, the streams those of a new seed."""
    if isinstance(saved, dict) and isinstance(fresh, dict):
        return {k: fresh[k] if k == "rng" and k in fresh else with_generators_of(v, fresh.get(k)) for k, v in saved.items()}
    return saved


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
