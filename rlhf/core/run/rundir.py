"""What a run leaves on disk: the one place that names the run directory's files.

    <run>/
        .hydra/config.yaml      the composed config (Hydra)
        .hydra/overrides.yaml   the command line's overrides (Hydra)
        metrics.jsonl           one JSON object per logged step (RunRecorder)
        summary.json            the final figures (RunRecorder)
        samples/step_00040.jsonl   held-out generations of each evaluation (5 digits)
        checkpoints/step_000040/   complete checkpoints (6 digits; rlhf.core.run.checkpoint)
        final/                  the trained adapters (or weights), value head and tokenizer
        error.txt               the traceback of a run that raised
        .lock                   the owner's pid, host and command while a process owns the run
    <rm run>/reward_model/      a reward model of rlhf-train-rm, and its normalization.json
    <sweep>/multirun.yaml       a sweep's config and overrides (Hydra), beside its runs
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

# final/ (and a checkpoint's weights): what peft, transformers and the value head write there
VALUE_HEAD = "value_head.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
BASE_RECORD = "rlhf_base.json"  # final/ of a full fine-tuning run: the policy.path it started from
HYDRA = ".hydra"
CONFIG = f"{HYDRA}/config.yaml"
OVERRIDES = f"{HYDRA}/overrides.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
OPTIMUM = "optimum.json"  # eval.kl_to_optimum: pi_ref, pi and pi* side by side
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
FINAL = "final"
ERROR = "error.txt"
REWARD_MODEL = "reward_model"
NORMALIZATION = "normalization.json"
SWEEP_RECORD = "multirun.yaml"
LOCK = ".lock"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"optimizer.beta": 0.1, ...} (what resume and rlhf-compare compare)."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# Settings a resumed run may change: they decide how long it runs, what it logs and where, not
# what a step computes (a linear lr schedule makes train.steps one that does; parallel changes
# only the order of floating-point sums). Any other change needs resume_force=true, and then
# takes effect from the step after the checkpoint (rlhf.core.loop.trainer.Trainer.restore) ...
RESUME_MAY_CHANGE = ("train.steps", "train.save_final", "eval.", "logger", "checkpoint.", "threads", "device",
                     "parallel", "resume", "resume_force")
# ... except these, which say what the checkpoint holds: another optimizer's state, adapters for
# another model. They are refused even with resume_force (a new run can start from this one).
RESUME_NEVER = ("optimizer._target_", "policy.path", "policy.revision", "policy.reference", "policy.lora.enabled",
                "policy.lora.r", "policy.lora.target_modules")


# Settings that say how a run was kept, not what it did: never a knob that tells methods apart.
BOOKKEEPING = ("resume", "resume_force", "checkpoint.", "logger", "threads", "device", "parallel")


def resume_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (recorded, new)} for every setting of a resume that changes what a step computes."""
    old_flat, new_flat = flatten(old), flatten(new)
    linear = new_flat.get("train.lr_schedule", "constant") != "constant"
    free = RESUME_MAY_CHANGE[1:] if linear else RESUME_MAY_CHANGE
    return {k: (old_flat.get(k, "<absent>"), new_flat.get(k, "<absent>")) for k in sorted(set(old_flat) | set(new_flat))
            if old_flat.get(k, "<absent>") != new_flat.get(k, "<absent>") and not k.startswith(free)}


def is_run(path: Path) -> bool:
    """A directory written by one of the commands (Hydra recorded its config there)."""
    return (Path(path) / CONFIG).is_file()


def is_reward_model(path: Path) -> bool:
    """A run of rlhf-train-rm (its reward model inside), not a policy's run."""
    return (Path(path) / REWARD_MODEL).is_dir()


class RunRecorder:
    """Writes `metrics.jsonl` (one object per logged step) and `summary.json`, always.

    Rows are flushed as they are logged and fsync'd with every checkpoint (`sync`), so the
    offset a checkpoint records is on disk before the checkpoint is. A resumed run cuts the
    file back to that offset; a file shorter than it (a crash before the rows reached the
    disk) or ending in half a row is repaired to its complete rows, and the repair is said.
    """

    def __init__(self, run_dir: Path, truncate_to: int | None = None):
        self.run_dir = run_dir
        path = run_dir / METRICS
        self.repairs: list[str] = []
        if truncate_to is not None:  # a resumed run: drop the rows logged after its checkpoint
            self.repairs = repair_log(path, truncate_to)
            for message in self.repairs:
                warnings.warn(message, stacklevel=2)
        self._file = open(path, "a")

    @property
    def offset(self) -> int:
        """Bytes written so far: where a resumed run cuts the file."""
        return self._file.tell()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(to_json({"step": step, **metrics}) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Every row logged so far on disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def summary(self, summary: dict[str, Any]) -> None:
        self.sync()
        write_atomic(self.run_dir / SUMMARY, to_json(summary, indent=2) + "\n")
        self._file.close()


def repair_log(path: Path, offset: int) -> list[str]:
    """Cut `metrics.jsonl` back to `offset` bytes (a checkpoint's), keeping whole rows only;
    what could not be kept is returned as messages."""
    if not path.exists():
        path.touch()
        return [f"{path} was missing: its rows up to the checkpoint are lost; the resumed run logs from here on"]
    data = path.read_bytes()
    keep = data[:offset]
    messages = []
    if len(data) < offset:
        messages.append(f"{path} holds {len(data)} bytes, fewer than the {offset} the checkpoint recorded (a crash "
                        "before they reached the disk?): kept its complete rows, the rest of them are lost")
    if keep and not keep.endswith(b"\n"):  # half a row: drop it
        cut = keep.rfind(b"\n") + 1
        messages.append(f"{path}: dropped a half-written last row ({len(keep) - cut} bytes)")
        keep = keep[:cut]
    bad = [i + 1 for i, line in enumerate(keep.splitlines()) if not _is_row(line)]
    if bad:
        messages.append(f"{path}: dropped line(s) {bad[:5]} that are not JSON rows (NUL bytes from a crash?)")
        keep = b"".join(line + b"\n" for line in keep.splitlines() if _is_row(line))
    if keep != data:
        write_atomic(path, keep)
    return messages


def _is_row(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


NONFINITE = "nonfinite"  # beside the nulls of a strict-JSON object: which values were NaN or infinite


def to_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (RFC 8259, which has no NaN or Infinity): a non-finite float is written as null,
    and an object holding one names it under "nonfinite" ({"loss/policy": "nan"}), so that
    `from_json` gives the same values back and a strict parser reads every file the project writes."""
    return json.dumps(_strict(obj), allow_nan=False, **kwargs)


def _strict(obj: Any) -> Any:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        odd = {str(k): repr(v) for k, v in obj.items() if isinstance(v, float) and not math.isfinite(v)}
        return {**{k: _strict(v) for k, v in obj.items()}, **({NONFINITE: odd} if odd else {})}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def from_json(text: str | bytes) -> Any:
    """What `to_json` wrote, with its non-finite values back (older files' bare NaN read too)."""
    def restore(d: dict) -> dict:
        for k, v in d.pop(NONFINITE, {}).items():
            d[k] = float(v)
        return d

    return json.loads(text, object_hook=restore)


def read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a `metrics.jsonl`, and a message for each line that is not one (a reader
    that must not fail on a damaged log: rlhf-compare)."""
    rows, problems = [], []
    for i, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = from_json(line)
        except ValueError:
            problems.append(f"{path}: line {i} is not JSON (a half-written row?); skipped")
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, problems


def read_samples(run: Path) -> dict[int, list[dict]]:
    """A run's saved evaluation samples, {step: rows}, in step order; a file that cannot be
    read is left out (a reader that must not fail: rlhf-diagnose, rlhf-compare)."""
    out = {}
    folder = Path(run) / SAMPLES
    for f in folder.glob("step_*.jsonl") if folder.is_dir() else []:
        try:
            out[int(f.stem.split("_")[1])] = [from_json(x) for x in f.read_text().splitlines() if x.strip()]
        except (ValueError, IndexError, OSError):
            continue
    return dict(sorted(out.items()))


def natural_key(path: Path) -> list[tuple[int, int, str]]:
    """Sort key that puts run 2 before run 10 (and numbered runs before named ones)."""
    return [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in Path(path).parts]


# ------------------------------------------------------------------------ ownership


class RunDirRefused(RuntimeError):
    """The run directory cannot be this run's: another process owns it, or it holds another run."""


class RunDirBusy(RunDirRefused):
    """Another live process owns the run directory (or the file)."""


class RunDirTaken(RunDirRefused):
    """The run directory already holds another run's files."""


class RunLock:
    """One owner for a run directory (or a preference file), for the life of the process: an
    exclusive `flock` on a lock file (`<run>/.lock`) that holds the owner's pid, host, start
    time and command. The kernel
    drops the lock when the process ends, however it ends (kill -9 included), so a lock
    left by a killed run is taken over safely; pid reuse does not matter. A second writer
    (another run, a second resume=, a labelling session) is refused, naming the holder."""

    def __init__(self, path: Path, target: str):
        self.path, self.target, self.fd, self.previous, self.record = Path(path), target, None, {}, {}
        self.same_job = False

    def acquire(self, job: str | None = None) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
                   f"{holder.get('command', '?')}") if holder else "a process that has not written its name yet"
            raise RunDirBusy(f"{self.target} is in use by another process ({who}); wait for it to end, "
                             "or use another one") from None
        self.previous = _read_holder(fd)  # the last owner's record; without "released", it died holding it
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "command": " ".join(sys.argv), **({"job": job} if job else {})}
        self._write(fd, self.record)
        self.fd = fd
        return self

    @staticmethod
    def _write(fd: int, record: dict) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)

    @property
    def died(self) -> bool:
        """Its last owner ended without releasing it (killed, most likely)."""
        return bool(self.previous) and not self.previous.get("released")

    def release(self) -> None:
        """Mark the record released (a clean end) and drop the lock."""
        if self.fd is None:
            return
        import fcntl

        self._write(self.fd, {**self.record, "released": True})
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def claim(run_dir: Path, continuing: bool, job: str | None = None) -> RunLock:
    """Own `run_dir` (created if missing) until the process ends or releases it. A new run
    (not `continuing` one that is there, and not the same submitit `job` requeued) is refused
    a directory that holds anything else, before anything is created in it."""
    run_dir = Path(run_dir)
    if not continuing and job is None and leftovers(run_dir) and not (run_dir / LOCK).exists():
        _taken(run_dir)  # refused without leaving a lock file behind (with one, a live owner is named)
    created = not (run_dir / LOCK).exists()
    owner = RunLock(run_dir / LOCK, f"run directory {run_dir}").acquire(job)
    owner.same_job = job is not None and owner.previous.get("job") == job
    if not continuing and not owner.same_job and leftovers(run_dir):
        owner.release()
        if created:
            (run_dir / LOCK).unlink(missing_ok=True)
        _taken(run_dir)
    if owner.died:
        warnings.warn(f"run directory {run_dir}: its last owner (pid {owner.previous.get('pid', '?')} on "
                      f"{owner.previous.get('host', '?')}) ended without releasing it, killed perhaps; taken over", stacklevel=2)
    return owner


def _taken(run_dir: Path) -> None:
    found = leftovers(run_dir)
    raise RunDirTaken(f"run directory {run_dir} already holds another run ({', '.join(found[:6])}"
                      f"{' ...' if len(found) > 6 else ''}): continue it with `rlhf-train resume={run_dir}`, "
                      "or leave hydra.run.dir at its default (a new directory every run)")


def discard_if_empty(run_dir: Path) -> None:
    """Remove a run directory that holds nothing (Hydra made it for a run refused before it
    started), and the default layout's folders above it (outputs/<date>/) if they are empty."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or leftovers(run_dir):
        return
    for p in run_dir.iterdir():  # an empty log, and a released lock
        p.unlink()
    run_dir.rmdir()
    import re

    date, top = run_dir.parent, run_dir.parent.parent
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.name) and not any(date.iterdir()):
        date.rmdir()
        if top.name == "outputs" and not any(top.iterdir()):
            top.rmdir()


def leftovers(run_dir: Path) -> list[str]:
    """What a run directory holds besides its lock and an empty log Hydra opened for this
    process: anything else belongs to another run."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name != LOCK and not (p.suffix == ".log" and p.is_file() and p.stat().st_size == 0))


# ------------------------------------------------------------------------ files a reader trusts


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` so that a reader sees the old file or the whole new one, never a part:
    a temporary file beside it, flushed to disk, renamed over it, the directory synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary file either
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Write a directory (`final/`, `reward_model/`) so that a reader finds the old one or the
    whole new one: the caller writes into the yielded `.partial-<name>`, which is flushed to
    disk and renamed into place; a crash leaves only the `.partial-` directory."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".partial-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    if path.exists():  # the old one goes only once the new one is complete
        old = path.with_name(f".old-{path.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_record(run_dir: Path, config: Any, hydra_config: Any, overrides: Any) -> None:
    """`.hydra/` (the config, Hydra's own and the overrides), each file atomically: written by
    the run once it owns the directory (and, resumed, once its checkpoint has loaded)."""
    from omegaconf import OmegaConf

    for name, node in (("config.yaml", config), ("hydra.yaml", hydra_config), ("overrides.yaml", overrides)):
        write_atomic(Path(run_dir) / HYDRA / name, OmegaConf.to_yaml(node))
