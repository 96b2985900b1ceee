"""The embedded arithmetic task: held-out accuracy and pass@k before and after RL.

    python benchmarks/arithmetic.py [out_dir] [--seeds 0 1] [--optimizers grpo rloo ppo]

Runs `rlhf-train +experiment=arithmetic optimizer=<name> seed=<s>` one after another (each
alone on the machine, so the wall times compare) and prints, per run, eval/accuracy and
eval/pass@k at step 0 and at the end (100 held-out sums, 8 samples each), the KL to the SFT
model and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="arithmetic_runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--optimizers", nargs="+", default=["grpo", "rloo", "ppo"])
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_args()
    out = Path(args.out)
    rows = []
    for name in args.optimizers:
        for seed in args.seeds:
            run = out / f"{name}-seed{seed}"
            t0 = time.time()
            subprocess.run(["rlhf-train", "+experiment=arithmetic", f"optimizer={name}", f"seed={seed}",
                            f"hydra.run.dir={run}", *args.overrides], check=True, capture_output=True)
            wall = time.time() - t0
            evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in r]
            first, last = evals[0], evals[-1]
            ks = sorted(int(k.split("@")[1]) for k in first if k.startswith("eval/pass@"))
            rows.append((name, seed, first, last, ks, wall))
    ks = rows[0][4]
    print("| optimizer | seed | accuracy | " + " | ".join(f"pass@{k}" for k in ks) + " | KL end | wall s |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in ks) + " | ---: | ---: |")
    for name, seed, first, last, ks, wall in rows:
        cells = [f"{first['eval/accuracy']:.3f} -> {last['eval/accuracy']:.3f}"]
        cells += [f"{first[f'eval/pass@{k}']:.3f} -> {last[f'eval/pass@{k}']:.3f}" for k in ks]
        print(f"| {name} | {seed} | " + " | ".join(cells) + f" | {last['eval/kl']:.3f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
