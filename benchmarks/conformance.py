"""The conformance table of the sequence toy problem: every optimizer, and the variants that
are not exact by construction, against the closed-form optimum over whole responses.

    python benchmarks/conformance.py run  conformance/   # the sweeps (about 40 min on 2 cores), then the table
    python benchmarks/conformance.py table conformance/  # the table of sweeps already run

Each cell is KL(pi || pi*) in nats after training (summary.json's kl_to_optimum), the
largest over the seeds run (0, 1 and 2 for the optimizers at their defaults; seed 0 for the
variants). The goal for a method that is exact by construction is 0.05.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from omegaconf import OmegaConf

BETAS = ("0.1", "0.5", "1.0")
COMMON = ["eval.every=1000", "threads=1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
SWEEPS = {  # sweep directory -> the rlhf-train -m overrides
    "onpolicy": ["+experiment=toy_sequences", "optimizer=ppo,a2c,reinforce,rloo,grpo", "seed=0,1,2"],
    "dpo": ["+experiment=toy_sequences_dpo", "seed=0,1,2"],
    "grpo_sum": ["+experiment=toy_sequences", "optimizer=grpo", "optimizer.loss_aggregation=sum"],
    "grpo_noscale": ["+experiment=toy_sequences", "optimizer=grpo", "optimizer.scale_rewards=false"],
    "grpo_loss_k3": ["+experiment=toy_sequences", "optimizer=grpo", "optimizer.kl_penalty=loss", "optimizer.kl_estimator=k3"],
    "reinforce_k3": ["+experiment=toy_sequences", "optimizer=reinforce", "optimizer.kl_estimator=k3"],
}
# fields that make a row a variant, with their defaults
VARIANT_FIELDS = {"kl_estimator": "k1", "kl_penalty": "reward", "loss_aggregation": "response_mean", "scale_rewards": True}


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in SWEEPS.items():
        cmd = ["rlhf-train", "-m", *overrides, f"optimizer.beta={','.join(BETAS)}", *COMMON, f"hydra.sweep.dir={name}"]
        print(" ".join(cmd), flush=True)
        with open(out / f"{name}.log", "w") as log:
            subprocess.run(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT, check=False)


def row_name(config) -> str:
    opt = config.optimizer
    name = str(opt._target_).rsplit(".", 1)[-1].lower()
    if name == "dpo":
        return "dpo (Bradley-Terry pairs of whole responses)"
    changed = [f"{k}={opt[k]}" for k, default in VARIANT_FIELDS.items() if k in opt and opt[k] != default]
    return f"{name} {' '.join(changed)}".strip()


def collect(out: Path) -> dict[str, dict[str, list[float]]]:
    cells: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for summary in sorted(out.rglob("summary.json")):
        config = OmegaConf.load(summary.parent / ".hydra" / "config.yaml")
        kl = json.loads(summary.read_text()).get("kl_to_optimum")
        if kl is not None:
            cells[row_name(config)][str(float(config.optimizer.beta))].append(kl)
    return cells


def table(out: Path) -> str:
    cells = collect(out)
    lines = ["| optimizer | " + " | ".join(f"beta {b}" for b in BETAS) + " | seeds |", "| --- |" + " ---: |" * (len(BETAS) + 1)]
    for name in sorted(cells, key=lambda n: (" " in n.split(" (")[0], n)):
        row = cells[name]
        shown = [f"{max(row[b]):.2g}" if row.get(b) else "-" for b in BETAS]
        lines.append(f"| {name} | " + " | ".join(shown) + f" | {max(len(v) for v in row.values())} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "table"])
    p.add_argument("out", type=Path, help="the directory of the sweeps")
    args = p.parse_args(argv)
    if args.what == "run":
        run(args.out)
    if not args.out.is_dir():
        sys.exit(f"no directory {args.out}: run `python benchmarks/conformance.py run {args.out}` first")
    print(table(args.out))


if __name__ == "__main__":
    main()
