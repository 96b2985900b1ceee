"""What a diagnosis reads and says: the run's record (its metrics rows, its config, its saved
samples: `Record`, `load`), a finding with its evidence and knobs (`Finding`, `Knob`), and
the helpers every detector uses."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.contracts import registry
from rlhf.contracts.metrics import (
    BETA,
    EVAL_REWARD,
    EVAL_REWARD_STD,
)
from rlhf.core.run import rundir

# --- how much is "moved": the reward's spread over the held-out samples at step 0 is the unit
SPREAD_FLOOR = 0.05  # the unit's floor: a step-0 spread of 0 (every sample scored alike) would make any change huge
MIN_EVALS = 3  # trends need a start, a middle and an end
MIN_TRAIN_ROWS = 10  # training-step statistics need this many steps


class Knob(str):
    """Advice on one setting: its text ("raise optimizer.beta (now {now})"), and `key`, the
    setting it turns (None: advice that is no setting, "stop earlier"); `value`, for a group,
    the option it suggests (optimizer=grpo)."""

    key: str | None
    value: Any

    def __new__(cls, key: str | None, text: str, value: Any = None) -> Knob:
        knob = super().__new__(cls, text)
        knob.key, knob.value = key, value
        return knob


@dataclass(frozen=True)
class Finding:
    name: str  # the pathology
    evidence: str  # the metrics and steps that show it
    knobs: tuple[str, ...]  # what to turn, with the direction (Knobs: each names its setting)
    sample: str | None = None  # a response that shows it

    def text(self) -> str:
        out = f"{self.name}: {self.evidence}\n  try: {'; '.join(self.knobs)}"
        if self.sample:
            out += f"\n  sample: {self.sample!r}"
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "evidence": self.evidence, "knobs": list(self.knobs), "sample": self.sample}


@dataclass
class Record:
    """What a diagnosis reads: the metrics rows logged so far, the run's config, its samples."""

    rows: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r[key])) for r in self.rows
                if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series(key)]

    def setting(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def has(self, key: str) -> bool:
        """Whether the run's config has this setting, or cannot tell (a record without the
        plugin's `_target_`: a key of that plugin's group is taken to exist)."""
        group = key.split(".")[0]
        if "." not in key or self.setting(f"{group}._target_") is None:
            return True
        return self.setting(key, _ABSENT) is not _ABSENT

    def advice(self, *knobs: Knob) -> tuple[Knob, ...]:
        """The knobs this run has and has not already turned the way they advise (a knob whose
        `value` is the run's setting, or its plugin's name for a group, is left out), their text
        filled with the current value (`{now}`)."""
        return tuple(Knob(k.key, k.format(now=fmt_any(self.setting(k.key)) if k.key else ""), k.value) for k in knobs
                     if k.key is None or (self.has(k.key) and not self.already(k)))

    def already(self, knob: Knob) -> bool:
        """Whether the run already has the setting `knob` advises."""
        if knob.key is None or knob.value is None:
            return False
        if "." not in knob.key:  # a group: the plugin it suggests
            target = self.setting(f"{knob.key}._target_")
            return target is not None and self.plugin_name(knob.key) == knob.value
        return self.setting(knob.key, _ABSENT) == knob.value

    def plugin_name(self, group: str) -> str | None:
        target = self.setting(f"{group}._target_")
        return next((p.name for p in registry.plugins(group) if p.target == target), None)

    @property
    def drawn_by_policy(self) -> bool:
        """Whether the rollouts were the policy's own samples (no proposal recorded: they were)."""
        cls = self.plugin("proposal")
        return cls is None or bool(cls.is_policy)

    @property
    def takes_correction(self) -> bool:
        """Whether the run's optimizer applies optimizer.correction (dm weighs by pi*/q itself)."""
        cls = self.plugin("optimizer")
        return cls is None or bool(cls.takes_importance_weights)  # (a record that does not say: it may)

    def plugin(self, group: str) -> type | None:
        """The class of the run's plugin of `group` (from its `_target_`), if registered."""
        target = self.setting(f"{group}._target_")
        return next((p.cls for p in registry.plugins(group) if p.target == target), None)

    @property
    def total_steps(self) -> int:
        steps = self.setting("train.steps", 0)
        return (steps if isinstance(steps, int) and steps > 0 else 0) or max((int(r["step"]) for r in self.rows), default=0)

    @property
    def last_step(self) -> int:
        return max((int(r["step"]) for r in self.rows), default=0)

    @property
    def progress(self) -> float:
        return self.last_step / self.total_steps if self.total_steps else 0.0


def load(run: Path) -> Record:
    """A run directory's record (its config from .hydra/config.yaml when there is one)."""
    rows = rundir.read_rows(run / rundir.METRICS)[0] if (run / rundir.METRICS).is_file() else []  # damaged lines skipped
    config: dict[str, Any] = {}
    if (run / rundir.CONFIG).is_file():
        from omegaconf import OmegaConf

        try:
            loaded = OmegaConf.load(run / rundir.CONFIG)
            try:
                config = OmegaConf.to_container(loaded, resolve=True)
            except Exception:  # an interpolation only the run could resolve (${now:...}, a resolver of its own)
                config = OmegaConf.to_container(loaded, resolve=False)
        except Exception:
            config = {}
    return Record(rows, config, rundir.read_samples(run))


# ---------------------------------------------------------------- helpers


def start_end(record: Record, key: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
    s = record.series(key)
    return (s[0], s[-1]) if len(s) >= 2 else None


def spread(record: Record) -> float:
    std, r = record.values(EVAL_REWARD_STD), record.values(EVAL_REWARD)
    floor = SPREAD_FLOOR * max(1.0, abs(r[0]) if r else 1.0)  # a reward every sample scores alike at step 0
    return max(std[0], floor) if std else 1.0


def reward_gain(record: Record) -> float | None:
    """The held-out reward's change from the first evaluation to the last, in step-0 spreads."""
    ends = start_end(record, EVAL_REWARD)
    return None if ends is None else (ends[1][1] - ends[0][1]) / spread(record)


def median_tail(record: Record, key: str, share: float = 0.5) -> float | None:
    """The median of `key` over the last `share` of its logged steps."""
    v = record.values(key)
    if len(v) < MIN_TRAIN_ROWS:
        return None
    return statistics.median(v[int(len(v) * (1 - share)) :])


def mean(v: list[float]) -> float:
    return sum(v) / len(v)


def span(record: Record, key: str, share: float = 0.1) -> tuple[float, float] | None:
    """The mean of `key` over its first and over its last `share` of logged steps."""
    v = record.values(key)
    if len(v) < MIN_TRAIN_ROWS:
        return None
    k = max(1, int(len(v) * share))
    return mean(v[:k]), mean(v[-k:])


def top_sample(record: Record) -> str | None:
    """The last evaluation's best-rewarded response: what the reward is paying for."""
    if not record.samples:
        return None
    rows = record.samples[max(record.samples)]
    best = max(rows, key=lambda r: r.get("reward", float("-inf")), default=None)
    return None if best is None else str(best.get("response", ""))[:200]


def current_beta(record: Record) -> float | None:
    b = record.values(BETA)
    if b:
        return b[-1]
    beta = record.setting("optimizer.beta")
    return float(beta) if isinstance(beta, (int, float)) else None


def fmt(x: float) -> str:
    return f"{x:.3g}"


def fmt_any(x: Any) -> str:
    return fmt(x) if isinstance(x, float) else str(x)


_ABSENT = object()


def time_bound(record: Record) -> tuple[str, dict[str, float]] | None:
    """(the phase that takes the largest share of the steps' time, each phase's share of it),
    from the `time/<phase>_s` rows the run logged (evaluations and checkpoints included); None
    when the run logged none."""
    totals: dict[str, float] = {}
    for row in record.rows:
        for k, v in row.items():
            if k.startswith("time/") and k != "time/step_s" and isinstance(v, (int, float)) and math.isfinite(v):
                name = k.removeprefix("time/").removesuffix("_s")
                totals[name] = totals.get(name, 0.0) + float(v)
    whole = sum(totals.values())
    if whole <= 0:
        return None
    shares = dict(sorted(((k, v / whole) for k, v in totals.items()), key=lambda kv: -kv[1]))
    return next(iter(shares)), shares

