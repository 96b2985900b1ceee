"""`rlhf-compare`: what differs between runs, and what it did to reward and KL.

Reads run directories (`.hydra/config.yaml`, `metrics.jsonl`, `summary.json`), prints a
table of the config fields that differ against the final figures, and writes
`reward_over_steps.png`, `frontier.png` (held-out reward against KL to the reference, one
point per evaluation, one curve per optimizer: the figure of Rafailov et al. 2023, Fig. 2)
and a self-contained `report.html` (images inlined) into the output directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.apps.report import fmt, report
from rlhf.contracts import registry
from rlhf.contracts.metrics import ENTROPY, EVAL_DISTINCT_2, EVAL_FLUENCY, EVAL_JUDGE, EVAL_KL, EVAL_REWARD
from rlhf.core.run import checkpoint, rundir

FIGURES = ("reward_end", "kl_end", "response_len_end", "distinct_2_end")
# runs of episodes: shown when a run has them
EPISODE_FIGURES = ("turns_end", "truncated_end", "tool_calls_end", "tool_errors_end")


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: {"optimizer.beta": 0.1, ...}
    summary: dict[str, Any]
    evals: list[dict[str, float]] = field(default_factory=list)  # metrics.jsonl rows with eval/reward
    rows: list[dict[str, Any]] = field(default_factory=list)  # every metrics.jsonl row (training steps too)

    @property
    def optimizer(self) -> str:
        """The optimizer's registered name, plus `online` for online DPO."""
        name = self.plugin("optimizer")
        return f"{name} online" if self.config.get("optimizer.online") else name

    def plugin(self, group: str) -> str:
        """The registered name of the run's plugin of `group` (its class name if unregistered)."""
        target = str(self.config.get(f"{group}._target_", "?"))
        names = {p.target: p.name for p in registry.plugins(group)}
        return names.get(target, target.rsplit(".", 1)[-1])


def incomplete_runs(paths: list[Path]) -> list[str]:
    """A line for each run directory under `paths` that has not finished (no summary.json): an
    interrupted or failed job of a sweep, with the last step it logged and how to go on."""
    out = []
    for root in paths:
        found = sorted((c.parent.parent for c in root.rglob(rundir.CONFIG)), key=rundir.natural_key)
        for d in found:
            if (d / rundir.SUMMARY).is_file() or rundir.is_reward_model(d):
                continue
            rows = rundir.read_rows(d / rundir.METRICS)[0] if (d / rundir.METRICS).is_file() else []
            last = max((r.get("step", 0) for r in rows), default=None)
            ckpts = checkpoint.complete(d)
            how = (f"continue it with `rlhf-train resume={d}` (from {ckpts[-1].name})" if ckpts
                   else "it wrote no checkpoint: run it again")
            error = " (failed: see its error.txt)" if (d / rundir.ERROR).is_file() else ""
            out.append(f"{d}: incomplete{error}, last logged step {last if last is not None else 'none'}; {how}")
    return out


def find_runs(paths: list[Path]) -> list[Run]:
    from omegaconf import OmegaConf

    runs = []
    for root in paths:
        if not root.exists():
            raise SystemExit(f"rlhf-compare: no such directory {root}")
        for summary in sorted(root.rglob(rundir.SUMMARY), key=lambda p: rundir.natural_key(p.parent)):
            d = summary.parent
            if not rundir.is_run(d) or rundir.is_reward_model(d):  # a reward model a sweep trained first
                continue
            try:  # one damaged run is named and left out; the others are still compared
                config = rundir.flatten(OmegaConf.to_container(OmegaConf.load(d / rundir.CONFIG), resolve=False))
                figures = rundir.from_json(summary.read_text())
            except Exception as e:
                print(f"rlhf-compare: {d} left out: its {rundir.SUMMARY} or {rundir.CONFIG} cannot be read ({e})",
                      file=sys.stderr)
                continue
            metrics = d / rundir.METRICS
            rows: list[dict] = []
            if metrics.is_file():
                rows, problems = rundir.read_rows(metrics)
                for problem in problems:
                    print(f"rlhf-compare: {problem}", file=sys.stderr)
            else:
                print(f"rlhf-compare: {d} has no {rundir.METRICS}: in the table, not in the plots", file=sys.stderr)
            runs.append(Run(d, config, figures, [r for r in rows if EVAL_REWARD in r and EVAL_KL in r], rows))
    return runs


def differing_fields(runs: list[Run]) -> list[str]:
    """Fields every run has, with more than one value among them. (A field only some runs
    have belongs to a plugin the others did not pick: the optimizer column says that.)"""
    keys = sorted(k for k in set.intersection(*(set(r.config) for r in runs)) if not k.startswith(rundir.BOOKKEEPING))
    differ = [k for k in keys if len({json.dumps(r.config[k], sort_keys=True) for r in runs}) > 1]
    # a plugin picked by name (proposal=explore) is its group's column, by name; the optimizer has its own
    return [k.removesuffix("._target_") if k.endswith("._target_") else k for k in differ
            if k != "optimizer._target_" and (not k.endswith("_target_") or k.endswith("._target_"))]


def value_of(run: Run, field_name: str) -> Any:
    """A field's value in a run, a group's by its plugin's registered name."""
    if field_name not in run.config and f"{field_name}._target_" in run.config:
        return run.plugin(field_name)
    return run.config.get(field_name)


def table(runs: list[Run], root: Path) -> tuple[list[str], list[list[str]]]:
    fields = differing_fields(runs)
    judges = sorted({k for r in runs for k in r.summary if k.startswith("judge_") and k.endswith("_end")})
    episodes = [k for k in (*EPISODE_FIGURES, "kl_to_optimum", "kl_to_tilt") if any(k in r.summary for r in runs)]
    header = ["run", "optimizer", *fields, *FIGURES, *episodes, *judges]
    rows = []
    for r in runs:
        rel = str(r.path.relative_to(root)) if r.path.is_relative_to(root) else str(r.path)
        values = [value_of(r, k) for k in fields] + [r.summary.get(k) for k in (*FIGURES, *episodes, *judges)]
        rows.append([rel, r.optimizer, *(fmt(v) for v in values)])
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _label(run: Run, fields: list[str]) -> str:
    """A legend label; `$` escaped, or matplotlib would read a config value as mathtext."""
    text = ", ".join(f"{k.split('.')[-1]}={fmt(value_of(run, k))}" for k in fields) or run.path.name
    return text.replace("$", r"\$")


# the fields a method sweeps to trace its frontier, and the seed: the same method at any of their values
KNOBS = ("seed", "optimizer.beta")


def methods(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """Runs grouped by method, then by setting (the same but for the seed). A method is the
    optimizer, its reward source where runs of one optimizer differ in it, and every field
    (but the knobs) whose value differs between runs of one optimizer and one plugin of the
    field's group (`optimizer.loss_type` between two DPO runs; not `reward.path`, which a
    learned reward model alone has). A setting adds the knobs a run has (sft has no beta)."""
    def varies(value, key: str = "") -> set:
        """The optimizers among whose runs (of one plugin of the key's group) `value` differs."""
        seen: dict[tuple, set] = {}
        group = key.split(".")[0]
        for r in runs:
            where = (r.optimizer, r.config.get(f"{group}._target_")) if key else (r.optimizer,)
            seen.setdefault(where, set()).add(json.dumps(value(r), sort_keys=True, default=str))
        return {where[0] for where, values in seen.items() if len(values) > 1}

    absent = object()
    keys = sorted({k for r in runs for k in r.config
                   if not k.endswith("_target_") and k not in KNOBS and not k.startswith(rundir.BOOKKEEPING)})
    # a plugin group picked by name (proposal=explore) tells methods apart too (optimizer and reward: below)
    groups = sorted({k.removesuffix("._target_") for r in runs for k in r.config if k.endswith("._target_")
                     and k.count(".") == 1 and k.split(".")[0] not in ("optimizer", "reward")})
    fields = {g: varies(lambda r, g=g: r.plugin(g) if f"{g}._target_" in r.config else "<absent>") for g in groups}
    fields.update({k: varies(lambda r, k=k: r.config.get(k, "<absent>"), k) for k in keys})
    fields = {k: v for k, v in fields.items() if v}
    knobs = [k for k in KNOBS if len({json.dumps(r.config.get(k), default=str) for r in runs if k in r.config}) > 1]
    rewards = varies(lambda r: r.plugin("reward"))
    out: dict[str, dict[str, list[Run]]] = {}
    for r in runs:
        rest = [f"{k.split('.')[-1]}={fmt(value_of(r, k))}" for k, where in fields.items()
                if r.optimizer in where and value_of(r, k) is not None and r.config.get(k, r.config.get(f"{k}._target_", absent))
                is not absent]
        method = " ".join([r.optimizer, *([f"reward={r.plugin('reward')}"] if r.optimizer in rewards else []), *rest])
        knob = " ".join(f"{k.split('.')[-1]}={fmt(r.config[k])}" for k in knobs if k != "seed" and k in r.config)
        out.setdefault(method, {}).setdefault(f"{method} {knob}".strip(), []).append(r)
    for by in out.values():
        for name, group in by.items():
            seeds = [r.config.get("seed") for r in group]
            if len(set(map(str, seeds))) < len(seeds):
                print(f"rlhf-compare: setting {name!r}: runs share a seed ({seeds}); they count as separate seeds",
                      file=sys.stderr)
    return out


def seeded(groups: dict[str, dict[str, list[Run]]]) -> bool:
    """Some setting (of `methods`' groups) was run with more than one seed."""
    return any(len(v) > 1 for m in groups.values() for v in m.values())


def _setting(name: str, group: list[Run], metric: str):
    """The seeds of one setting as rlhf.core.evaluation.frontier takes them: each run's (step, KL, metric)."""
    from rlhf.core.evaluation.frontier import setting

    return setting(name, [[(e["step"], e[EVAL_KL], e[metric]) for e in r.evals if metric in e]
                          for r in group if any(metric in e for e in r.evals)])


def frontiers(groups: dict[str, dict[str, list[Run]]], metric: str, rng) -> list:
    """Each method's frontier over its settings' seed means, with its bootstrap band."""
    from rlhf.core.evaluation import frontier as fr

    settings = {m: [s for s in (_setting(name, group, metric) for name, group in by.items()) if s.seeds and s.steps]
                for m, by in groups.items()}
    settings = {m: v for m, v in settings.items() if v}
    if not settings:
        return []
    grid = fr.kl_grid([s for v in settings.values() for s in v])
    return [fr.frontier(m, v, grid, rng) for m, v in sorted(settings.items())]


def seed_table(groups: dict[str, dict[str, list[Run]]], metric: str, rng) -> tuple[list[str], list[list[str]]]:
    """Per setting: its seeds, and the mean and 95% bootstrap interval of the final metric and KL."""
    from rlhf.core.evaluation.frontier import interval

    header = ["setting", "seeds", f"{metric} (end)", "95% interval", "eval/kl (end)", "95% interval"]
    rows = []
    for by in groups.values():
        for name, group in by.items():
            last = [r.evals[-1] for r in group if r.evals and metric in r.evals[-1]]
            if not last:
                continue
            m, lo, hi = interval([e[metric] for e in last], rng)
            k, klo, khi = interval([e[EVAL_KL] for e in last], rng)
            rows.append([name, str(len(last)), f"{m:.3f}", f"[{lo:.3f}, {hi:.3f}]", f"{k:.2f}", f"[{klo:.2f}, {khi:.2f}]"])
    return header, rows


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The upper-left envelope: points no other point beats in reward at lower or equal KL."""
    best, out = float("-inf"), []
    for kl, reward in sorted(points):
        if reward > best:
            out.append((kl, reward))
            best = reward
    return out


def _metric_label(metric: str) -> str:
    return "held-out reward" if metric == EVAL_REWARD else f"held-out {metric.removeprefix('eval/')}"


def plots(runs: list[Run], out: Path, metric: str = EVAL_REWARD, found: list | None = None,
          groups: dict[str, dict[str, list[Run]]] | None = None) -> dict[str, Path]:
    """The figures. `groups`: the runs by method and setting (`methods`); `found`: the methods'
    frontiers over seeds (`frontiers`), when some setting has seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups if groups is not None else methods(runs)
    fields = differing_fields(runs)
    files = {}
    several = len({r.optimizer for r in runs}) > 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in (r for r in runs if r.evals):  # a run without a metrics log is in the table only
        label = f"{r.optimizer}: {_label(r, fields)}" if several else _label(r, fields)
        points = [(e["step"], e[metric]) for e in r.evals if metric in e]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, label=label)
    ax.set(xlabel="step", ylabel=_metric_label(metric), title=f"{_metric_label(metric).capitalize()} over training")
    if ax.get_legend_handles_labels()[0] and len(runs) <= 16:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    files["reward_over_steps"] = out / "reward_over_steps.png"
    fig.tight_layout()
    fig.savefig(files["reward_over_steps"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if found is not None:
        for i, f in enumerate(found):
            color = f"C{i}"
            ax.plot(f.grid, f.mean, color=color, label=f"{f.method} ({f.seeds}+ seeds)")
            ax.fill_between(f.grid, f.low, f.high, color=color, alpha=0.2, lw=0)
        for i, (m, by) in enumerate(sorted(groups.items())):
            for name, group in by.items():  # each setting's seed-mean points
                one = _setting(name, group, metric)
                if one.seeds and one.steps:
                    ax.scatter(*one.points(), s=12, alpha=0.5, color=f"C{i}")
        title = "Reward-KL frontier: seed means, 95% bootstrap band"
    else:
        by_method: dict[str, list[tuple[float, float]]] = {}
        for m, by in groups.items():
            by_method[m] = [(e[EVAL_KL], e[metric]) for g in by.values() for r in g for e in r.evals if metric in e]
        for i, (name, points) in enumerate(sorted((k, v) for k, v in by_method.items() if v)):
            color = f"C{i}"
            ax.scatter(*zip(*points), s=14, alpha=0.5, color=color)
            ax.plot(*zip(*frontier(points)), color=color, label=name)
        title = "Reward-KL frontier (one point per evaluation)"
    ax.set(xlabel="KL(pi || pi_ref), nats", ylabel=_metric_label(metric), title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    files["frontier"] = out / "frontier.png"
    fig.tight_layout()
    fig.savefig(files["frontier"], dpi=110)
    plt.close(fig)
    files.update(curves(runs, out, fields, several, plt))
    gold = gold_vs_proxy(runs, out, fields, plt)
    if gold is not None:
        files["gold_vs_proxy"] = gold
    return files


CURVES = ((EVAL_KL, "KL to the reference (nats)"), (EVAL_FLUENCY, "fluency: log-lik per token under the reference"),
          (ENTROPY, "policy entropy (nats per token)"), (EVAL_DISTINCT_2, "distinct-2"))


def curves(runs: list[Run], out: Path, fields: list[str], several: bool, plt) -> dict[str, Path]:
    """KL, fluency, entropy, distinct-2 and every judge over steps, a panel each, beside the reward curve."""
    judges = sorted({k for r in runs for row in r.evals for k in row if k.startswith(EVAL_JUDGE)})
    panels = [(k, t) for k, t in (*CURVES, *((j, f"judge {j.removeprefix('eval/judge/')}") for j in judges))
              if any(k in row for r in runs for row in r.rows)]
    if not panels:
        return {}
    cols = min(3, len(panels))
    lines = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.2 * lines), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        for r in runs:
            points = [(row["step"], row[key]) for row in r.rows if key in row]
            if points:
                label = f"{r.optimizer}: {_label(r, fields)}" if several else _label(r, fields)
                ax.plot(*zip(*points), marker="o" if key.startswith("eval/") else None, ms=2, lw=1, label=label)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles and len(runs) <= 12:
        fig.legend(handles, labels, fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "curves_over_steps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"curves_over_steps": path}


def gold_vs_proxy(runs: list[Run], out: Path, fields: list[str], plt) -> Path | None:
    """The optimized (proxy) reward and the first judge (the gold reward) against sqrt(KL), as
    Gao et al. 2022 plot over-optimisation; a star where the gold peaks."""
    with_gold = [(r, next(k for k in r.evals[0] if k.startswith(EVAL_JUDGE))) for r in runs
                 if r.evals and any(k.startswith(EVAL_JUDGE) for k in r.evals[0])]
    # a judge that is the run's own reward (the same scores) says nothing about over-optimisation
    with_gold = [(r, k) for r, k in with_gold if any(abs(e.get(k, 0.0) - e[EVAL_REWARD]) > 1e-9 for e in r.evals)]
    if not with_gold:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (r, key) in enumerate(with_gold):
        x = [max(e[EVAL_KL], 0.0) ** 0.5 for e in r.evals]
        gold = [e.get(key, float("nan")) for e in r.evals]
        label = _label(r, fields)
        ax.plot(x, [e[EVAL_REWARD] for e in r.evals], color=f"C{i}", marker="o", ms=3, label=f"proxy (reward): {label}")
        ax.plot(x, gold, color=f"C{i}", ls="--", marker="s", ms=3, label=f"gold ({key.removeprefix('eval/judge/')}): {label}")
        peak = max(range(len(gold)), key=lambda j: gold[j])
        ax.plot([x[peak]], [gold[peak]], color=f"C{i}", marker="*", ms=14, ls="none")
    ax.set(xlabel="sqrt(KL(pi || pi_ref)), sqrt(nats)", ylabel="reward",
           title="Gold and proxy reward against sqrt(KL) (star: gold's peak)")
    if len(with_gold) <= 8:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = out / "gold_vs_proxy.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def seeds_text(groups: dict[str, dict[str, list[Run]]], found: list, metric: str, rng) -> tuple:
    """The per-setting table, the frontiers at round KLs and the statements."""
    from rlhf.core.evaluation.frontier import at_kls, statements

    return (seed_table(groups, metric, rng), at_kls(found),
            statements(found) or ["only one method: nothing to compare"])


def compare(paths: list[Path], out: Path | None = None, metric: str = EVAL_REWARD) -> Path:
    """Print the table, write the plots and the report; return the report's path. `metric` is
    the frontier's reward axis (eval/reward, or a judge's eval/judge/<name>, the gold reward)."""
    import numpy as np

    paths = [p.resolve() for p in paths]
    runs, unfinished = find_runs(paths), incomplete_runs(paths)
    if not runs:
        raise SystemExit(f"rlhf-compare: no finished run directories (with summary.json and .hydra/) under "
                         f"{', '.join(map(str, paths))}" + "".join(f"\n  {line}" for line in unfinished))
    have = sorted({k for r in runs for e in r.evals for k in e if k.startswith("eval/")})
    if not any(metric in e for r in runs for e in r.evals):
        raise SystemExit(f"rlhf-compare: --metric {metric}: no run logged it; logged: {', '.join(have)}")
    root = paths[0] if len(paths) == 1 else Path(*_common(paths))
    out = (out or root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs, root)
    print(f"{len(runs) + len(unfinished)} runs" + (f": {len(runs)} finished, {len(unfinished)} incomplete (not in the "
                                                      "table):" + "".join(f"\n  {u}" for u in unfinished) if unfinished else "")
          + f"\n{text_table(header, rows)}")
    rng = np.random.default_rng(0)
    groups = methods(runs)
    found = frontiers(groups, metric, rng) if seeded(groups) else None  # the bootstrap, once: tables and plot
    seeds = seeds_text(groups, found, metric, rng) if found is not None else None
    if seeds is not None:
        (h, r), (fh, fr_), lines = seeds
        print(f"\nover seeds ({metric}, mean and 95% bootstrap interval)\n{text_table(h, r)}")
        if fr_:
            print(f"\nfrontiers: the best seed-mean {metric} at KL <= x [95% band]\n{text_table(fh, fr_)}")
        print("\n" + "\n".join(lines))
    path = report(root, out, runs, (header, rows), plots(runs, out, metric, found, groups), seeds)
    print(f"report: {path}")
    return path


def _common(paths: list[Path]) -> list[str]:
    parts = [p.parts for p in paths]
    return [a for a, *rest in zip(*parts) if all(a == b for b in rest)] or ["/"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="a sweep directory, or several run directories")
    p.add_argument("--out", type=Path, help="where to write the plots and report.html (default: the sweep directory)")
    p.add_argument("--metric", default=EVAL_REWARD,
                   help="the frontier's reward axis: eval/reward (default) or a judge, e.g. eval/judge/sentiment")
    args = p.parse_args(argv)
    compare(args.dirs, args.out, args.metric)


if __name__ == "__main__":
    main()
