"""Reward-KL frontiers over seeds, with bootstrap bands.

A method (an optimizer with its reward source, say) is run at several settings of its knob
(beta), each with several seeds. A setting's curve is the seed-mean (KL, reward) at each
evaluation step. The method's frontier is the upper envelope of its settings' points: at
each KL x, the best mean reward any of its evaluations reached at KL <= x, as the DPO paper
draws it (Rafailov et al. 2023, Fig. 2). Its uncertainty comes from the seeds: a bootstrap
resample draws each setting's seeds again with replacement, recomputes the mean points and
the envelope; the band is the 2.5 and 97.5 percentiles of the resampled frontiers at each x,
and one method dominates another at x when its resampled frontier lies above in 95% of the
resamples (each method resampled independently). With 3 seeds a setting has only 10
distinct resamples: the band is a coarse guide, not a test at an exact level.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

LEVEL = 0.95  # the band's coverage, and the share of resamples a dominating frontier must lead in
RESAMPLES = 1000


@dataclass
class Setting:
    """One configuration's seeds: each seed's (steps, KLs, rewards) at its evaluations."""

    name: str
    seeds: list[np.ndarray] = field(default_factory=list)  # each (2, E): KL row, reward row at the common steps
    steps: list[int] = field(default_factory=list)

    def points(self, pick: np.ndarray | None = None) -> np.ndarray:
        """(2, E): the mean KL and reward over the seeds `pick` (indices; all of them by default)."""
        stack = np.stack(self.seeds)  # (S, 2, E)
        return (stack if pick is None else stack[pick]).mean(0)


def setting(name: str, curves: list[list[tuple[int, float, float]]]) -> Setting:
    """A setting from each seed's evaluations (step, KL, reward), on the steps every seed has
    (an evaluation with a KL or reward that is not a number is left out)."""
    curves = [[(s, kl, r) for s, kl, r in c if math.isfinite(kl) and math.isfinite(r)] for c in curves]
    common = sorted(set.intersection(*({s for s, _, _ in c} for c in curves))) if curves else []
    s = Setting(name, steps=common)
    for c in curves:
        by_step = {step: (kl, r) for step, kl, r in c}
        s.seeds.append(np.array([[by_step[t][0] for t in common], [by_step[t][1] for t in common]], dtype=float))
    return s


def envelope(points: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The best reward at KL <= x for each x of the grid; nan outside the KLs the points span
    (left of the smallest, nothing reached yet; right of the largest, never tried). points (2, N)."""
    order = np.argsort(points[0])
    kl, best = points[0][order], np.fmax.accumulate(points[1][order])
    at = np.searchsorted(kl, grid, side="right") - 1
    return np.where((at >= 0) & (grid <= kl[-1]), best[np.clip(at, 0, None)], np.nan)


@dataclass
class Frontier:
    method: str
    grid: np.ndarray  # KL values
    mean: np.ndarray  # the frontier of the seed means
    low: np.ndarray
    high: np.ndarray
    draws: np.ndarray  # (RESAMPLES, len(grid)) the resampled frontiers
    seeds: int  # the fewest seeds any of its settings has


def frontier(method: str, settings: list[Setting], grid: np.ndarray, rng: np.random.Generator,
             resamples: int = RESAMPLES) -> Frontier:
    settings = [s for s in settings if s.seeds and s.steps]
    mean = envelope(np.concatenate([s.points() for s in settings], 1), grid)
    draws = np.empty((resamples, len(grid)))
    for b in range(resamples):
        pts = [s.points(rng.integers(0, len(s.seeds), len(s.seeds))) for s in settings]
        draws[b] = envelope(np.concatenate(pts, 1), grid)
    tail = (1 - LEVEL) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns: left of the method's first point
        low, high = np.nanquantile(draws, tail, 0), np.nanquantile(draws, 1 - tail, 0)
    return Frontier(method, grid, mean, low, high, draws, min(len(s.seeds) for s in settings))


def kl_grid(settings: list[Setting], n: int = 200) -> np.ndarray:
    """From the smallest to the largest mean KL any setting reached."""
    kls = np.concatenate([s.points()[0] for s in settings if s.seeds and s.steps])
    return np.linspace(max(float(kls.min()), 0.0), float(kls.max()), n)


MIN_SPAN = 0.05  # a lead over less than this share of the KL axis is not reported: single grid points are noise


def dominance(a: Frontier, b: Frontier) -> list[tuple[float, float, float]]:
    """The KL intervals where a's frontier is above b's in at least LEVEL of the resamples
    (both defined there), each at least MIN_SPAN of the axis wide: (from, to, the smallest
    share of resamples a leads in on it)."""
    valid = ~np.isnan(a.draws) & ~np.isnan(b.draws)  # resamples where both frontiers reach x
    lead = (valid & (a.draws > b.draws)).sum(0) / np.maximum(valid.sum(0), 1)
    ahead = ~np.isnan(a.mean) & ~np.isnan(b.mean) & (lead >= LEVEL)
    spans, start = [], None
    wide = MIN_SPAN * (a.grid[-1] - a.grid[0])
    for i, on in enumerate(list(ahead) + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            if a.grid[i - 1] - a.grid[start] >= wide:
                spans.append((float(a.grid[start]), float(a.grid[i - 1]), float(np.min(lead[start:i]))))
            start = None
    return spans


def statements(frontiers: list[Frontier]) -> list[str]:
    """Which frontier dominates which on which KL range, and where no method is ahead of another.
    Only methods whose every setting has 2+ seeds are compared: one seed has no spread to resample."""
    lines = [f"{f.method}: a setting with one seed, left out of the comparison (no spread to resample)"
             for f in frontiers if f.seeds < 2]
    frontiers = [f for f in frontiers if f.seeds >= 2]
    for a in frontiers:
        for b in frontiers:
            if a is b:
                continue
            for lo, hi, share in dominance(a, b):
                lines.append(f"{a.method} above {b.method} for KL in [{lo:.2f}, {hi:.2f}] nats "
                             f"(in >= {share:.0%} of {len(a.draws)} bootstrap resamples of the seeds)")
    for i, a in enumerate(frontiers):
        for b in frontiers[i + 1:]:
            both = ~np.isnan(a.mean) & ~np.isnan(b.mean)
            if both.any() and not dominance(a, b) and not dominance(b, a):
                lines.append(f"{a.method} and {b.method}: neither above the other at {LEVEL:.0%} anywhere their "
                             f"frontiers overlap (KL {a.grid[both][0]:.2f} to {a.grid[both][-1]:.2f} nats)")
    return lines


def interval(values: list[float], rng: np.random.Generator, resamples: int = RESAMPLES) -> tuple[float, float, float]:
    """Mean and bootstrap percentile interval of the mean of `values` (one per seed)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    means = v[rng.integers(0, len(v), (resamples, len(v)))].mean(1)
    tail = (1 - LEVEL) / 2
    return float(v.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


NICE_KL = (0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def at_kls(frontiers: list[Frontier]) -> tuple[list[str], list[list[str]]]:
    """The frontiers in numbers: each method's mean [band] at round KL values within the grid
    (blank where the method never reached or never tried that KL)."""
    if not frontiers:
        return [], []
    grid = frontiers[0].grid
    kls = [k for k in NICE_KL if grid[0] <= k <= grid[-1]]
    header = ["method", *(f"KL {k:g}" for k in kls)]
    rows = []
    for f in frontiers:
        cells = []
        for k in kls:
            i = int(np.searchsorted(grid, k, side="right")) - 1
            cells.append("" if np.isnan(f.mean[i]) else f"{f.mean[i]:.2f} [{f.low[i]:.2f}, {f.high[i]:.2f}]")
        rows.append([f.method, *cells])
    return header, rows
