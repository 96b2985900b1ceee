"""Which optimizers reach the soft-Bellman optimum over episodes, and which converge elsewhere.

    python benchmarks/episodes.py [out_dir] [--jobs 2] [--seeds 0,1] [--steps 1500]
    python benchmarks/episodes.py [out_dir] --calculator [--seeds 0,1,2]

Every optimizer that takes episodes on `+experiment=episode_toy` (the dice environment: a move,
a random answer that depends on it, a second move, a reward at the end; beta 0.5), to the
preset's end (its settings: beta 0.5, lr 3e-3, 128 episodes a step, 1500 steps): the last
evaluation's exact KL(pi || pi*) to the soft-Bellman optimum and
KL(pi || tilt) to the whole-episode tilt pi_ref(tau) exp(R / beta) / Z, the optimistic policy
that assumes it chooses the dice. A method reaches pi* when its KL is at most 0.05; one that
lands on the tilt instead has solved the wrong objective. Also the episodes per second of
training (the runs' wall time, one torch thread each).

With --calculator: the tool the model really uses (`+experiment=calculator`: products of two
numbers below 100, held out from training), the preset with the calculator and the same preset
with `env.enabled=false` (the same model and RL without the tool), each seed: the held-out
accuracy before and after RL, the tool-call rate and tool errors at the end, episodes a second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# the same 128 episodes a step for every optimizer (a grouped one: prompts x its k)
OPTIMIZERS = {"reinforce": ["optimizer=reinforce"], "rloo": ["optimizer=rloo", "optimizer.k=4", "train.batch_size=32"],
              "grpo": ["optimizer=grpo", "optimizer.group_size=4", "train.batch_size=32"],
              "grpo-unscaled": ["optimizer=grpo", "optimizer.group_size=4", "train.batch_size=32",
                                "optimizer.scale_rewards=false"],
              "ppo": ["optimizer=ppo"], "a2c": ["optimizer=a2c"],
              "dm": ["optimizer=dm", "optimizer.k=8", "train.batch_size=16"]}
REACHED = 0.05


def run(out: Path, name: str, extra: list[str], seed: int, steps: int) -> dict:
    d = out / f"{name}-seed{seed}"
    if not (d / "summary.json").is_file():
        t0 = time.time()
        r = subprocess.run(["rlhf-train", "+experiment=episode_toy", *extra, f"seed={seed}",
                            f"train.steps={steps}", "threads=1", f"hydra.run.dir={d}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} seed {seed} failed:\n{r.stderr[-3000:]}")
        (d / "bench.json").write_text(json.dumps({"wall_s": time.time() - t0}))
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in rows if "eval/kl_to_optimum" in x][-1]
    summary = json.loads((d / "summary.json").read_text())
    return {"kl": last["eval/kl_to_optimum"], "tilt": last["eval/kl_to_tilt"], "wall": summary["wall_s"],
            "steps": summary["steps"], "reward": last["eval/reward"], "run": str(d)}


def calculator(out: Path, seeds: list[int], jobs: int) -> None:
    arms = {"with the calculator": [], "without (env.enabled=false)": ["env.enabled=false"]}
    cases = [(arm, extra, s) for arm, extra in arms.items() for s in seeds]

    def one(case):
        arm, extra, seed = case
        d = out / f"calculator-{'off' if extra else 'on'}-seed{seed}"
        if not (d / "summary.json").is_file():
            r = subprocess.run(["rlhf-train", "+experiment=calculator", *extra, f"seed={seed}", "threads=1",
                                f"hydra.run.dir={d}"], capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"calculator {arm} seed {seed} failed:\n{r.stderr[-3000:]}")
        summary = json.loads((d / "summary.json").read_text())
        batch = 16 * 4  # the preset's prompts a step x GRPO's group
        return {**summary, "eps": summary["steps"] * batch / summary["wall_s"]}

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, cases))
    print("| arm | held-out accuracy before RL | after RL (median, each seed) | tool calls an episode (end) | "
          "tool errors an episode (end) | episodes/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for arm in arms:
        rs = [r for (a, _, _), r in zip(cases, results) if a == arm]
        ends = ", ".join(f"{r['reward_end']:.3f}" for r in rs)
        print(f"| {arm} | {statistics.median(r['reward_start'] for r in rs):.3f} | "
              f"{statistics.median(r['reward_end'] for r in rs):.3f} ({ends}) | "
              f"{statistics.median(r['tool_calls_end'] for r in rs):.3f} | "
              f"{statistics.median(r['tool_errors_end'] for r in rs):.3f} | {statistics.median(r['eps'] for r in rs):.0f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="episode_runs")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--calculator", action="store_true", help="the calculator's table instead of the optimizers'")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.calculator:
        return calculator(out, seeds, args.jobs)
    cases = [(n, e, s) for n, e in OPTIMIZERS.items() for s in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: run(out, c[0], c[1], c[2], args.steps), cases))
    print("| optimizer | KL(pi \\|\\| pi*) median (largest) | KL(pi \\|\\| tilt) median | reaches pi* (<= 0.05) | "
          "lands on | held-out return |")
    print("| --- | ---: | ---: | --- | --- | ---: |")
    for name in OPTIMIZERS:
        rs = [r for (n, _, _), r in zip(cases, results) if n == name]
        kl, tilt = [r["kl"] for r in rs], [r["tilt"] for r in rs]
        where = ("pi*" if statistics.median(kl) <= REACHED else
                 "the tilt" if statistics.median(tilt) <= REACHED else "neither")
        print(f"| {name} | {statistics.median(kl):.4f} ({max(kl):.4f}) | {statistics.median(tilt):.4f} | "
              f"{sum(k <= REACHED for k in kl)} of {len(kl)} | {where} | {statistics.median(r['reward'] for r in rs):.3f} |")
    eps = sum(r["steps"] * 128 for r in results) / sum(r["wall"] for r in results)
    print(f"\nwall of the runs: {sum(r['wall'] for r in results):.0f} s; {len(results)} runs of {args.steps} steps; "
          f"{eps:.0f} episodes a second of training (evaluations included, one thread a run)")


if __name__ == "__main__":
    main()
