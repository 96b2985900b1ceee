"""Proposals x corrections against the closed-form optimum: the hard toys, and a stale sampler.

    python benchmarks/proposals.py run   proposals/   # every run (about 25 min on 2 cores), then the tables
    python benchmarks/proposals.py run   proposals/ --only stale   # one table's runs
    python benchmarks/proposals.py run   proposals/ --only vllm --rows "core loop (policy);vLLM float32, bypass"
    python benchmarks/proposals.py table proposals/   # the tables of runs already made

Hard toys (`+experiment=hard_toys reward.seed=N`): for each prompt pi* at beta 0.5 puts 0.75 on
a response the reference gives 1e-4 to 1e-3. Each configuration runs on toys 0-4 (seed 0;
the best one also seed 1), 600 steps of 128 rollouts; a cell gives KL(pi || pi*) at the end
(the largest over toys and seeds), how many runs reach 0.05, and the median step at which the
evaluations (every 25 steps) first show it.

A proposal that is not the policy (`+experiment=toy_sequences optimizer.beta=0.5`, where every
optimizer lands on pi*): REINFORCE sampling from the policy k = 4 updates old, or from the
policy at temperature 2, with each correction, seeds 0-2.

vLLM drawing the rollouts (the same toy with one attention head of 32 dimensions, a size its
CPU kernels run): a float32 engine, and a bfloat16 engine against the float32 trainer with
each correction, seeds 0-2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

COMMON = ["eval.every=25", "threads=1"]
ROLLOUTS = ["train.batch_size=16"]  # k = 8 samples of 16 prompts: the 128 rollouts of the presets' batch
EXPLORE = ["proposal=explore", "proposal.temperature=2.0"]
HARD = {  # name -> overrides (on +experiment=hard_toys)
    "ppo (policy)": ["optimizer=ppo"],
    "reinforce (policy)": ["optimizer=reinforce"],
    "reinforce, explore T=2, correction=sequence": ["optimizer=reinforce", *EXPLORE, "optimizer.correction=sequence"],
    "grpo, explore T=2, correction=sequence": ["optimizer=grpo", *EXPLORE, "optimizer.correction=sequence",
                                               "train.batch_size=32"],
    "dm (policy)": ["optimizer=dm", "optimizer.lr=3e-3", *ROLLOUTS],
    "dm, explore T=2": ["optimizer=dm", "optimizer.lr=3e-3", *ROLLOUTS, *EXPLORE],
    "dm, explore mix_uniform=0.3": ["optimizer=dm", "optimizer.lr=3e-3", *ROLLOUTS, "proposal=explore",
                                    "proposal.mix_uniform=0.3"],
}
BEST = "dm, explore T=2"
TOYS = range(5)
STALE = {
    "policy (on-policy)": [],
    "stale k=4, correction=none": ["proposal=stale", "proposal.k=4"],
    "stale k=4, correction=sequence": ["proposal=stale", "proposal.k=4", "optimizer.correction=sequence"],
    "stale k=4, correction=token_tis": ["proposal=stale", "proposal.k=4", "optimizer.correction=token_tis"],
    "stale k=4, correction=sequence_mis": ["proposal=stale", "proposal.k=4", "optimizer.correction=sequence_mis"],
    "stale k=4, constant lr, correction=none": ["proposal=stale", "proposal.k=4", "train.lr_schedule=constant"],
    "stale k=4, constant lr, correction=sequence": ["proposal=stale", "proposal.k=4", "train.lr_schedule=constant",
                                                    "optimizer.correction=sequence"],
    "policy, constant lr": ["train.lr_schedule=constant"],
    "explore T=2, correction=none": [*EXPLORE],
    "explore T=2, correction=sequence": [*EXPLORE, "optimizer.correction=sequence"],
    "explore T=2, correction=token_tis": [*EXPLORE, "optimizer.correction=token_tis"],
}


VLLM = ["policy.path=toy:3x4:eos:heads1"]  # one head of 32 dimensions: a size vLLM's CPU attention runs
ENGINE = {
    "core loop (policy)": [],
    "vLLM float32, correction=none": ["proposal=vllm"],
    "vLLM bfloat16, correction=none": ["proposal=vllm", "proposal.dtype=bfloat16"],
    "vLLM bfloat16, correction=sequence": ["proposal=vllm", "proposal.dtype=bfloat16", "optimizer.correction=sequence"],
    "vLLM bfloat16, correction=token_tis": ["proposal=vllm", "proposal.dtype=bfloat16", "optimizer.correction=token_tis"],
    "vLLM bfloat16, correction=sequence_mis": ["proposal=vllm", "proposal.dtype=bfloat16",
                                               "optimizer.correction=sequence_mis"],
    # the faster paths of the step table (issue 40): each must land where the core loop does
    "core loop, precision=bf16": ["precision=bf16"],
    "vLLM float32, bypass": ["proposal=vllm", "proposal.bypass=true"],
    "vLLM bfloat16 + precision=bf16, correction=sequence": ["proposal=vllm", "proposal.dtype=bfloat16", "precision=bf16",
                                                            "optimizer.correction=sequence"],
}


def runs() -> list[tuple[str, str, list[str]]]:
    """(table, row, the rlhf-train overrides) of every run."""
    out = []
    for name, overrides in HARD.items():
        for toy in TOYS:
            for seed in (0, 1) if name == BEST else (0,):
                out.append(("hard", name, ["+experiment=hard_toys", f"reward.seed={toy}", f"seed={seed}", *overrides]))
    for name, overrides in STALE.items():
        for seed in (0, 1, 2):
            out.append(("stale", name, ["+experiment=toy_sequences", "optimizer=reinforce", "optimizer.beta=0.5",
                                        f"seed={seed}", *overrides]))
    for name, overrides in ENGINE.items():
        for seed in (0, 1, 2):
            out.append(("vllm", name, ["+experiment=toy_sequences", *VLLM, "optimizer=reinforce", "optimizer.beta=0.5",
                                       f"seed={seed}", *overrides]))
    return out


def directory(out: Path, table: str, overrides: list[str]) -> Path:
    return out / table / "-".join(o.split("=", 1)[1].replace("/", "_").replace(",", "_").replace(":", "_") for o in overrides[1:])


def run(out: Path, only: str | None, rows: list[str] | None = None) -> None:
    for table, name, overrides in runs():
        d = directory(out, table, overrides)
        if (d / "summary.json").is_file() or only not in (None, table) or (rows and name not in rows):
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        with open(str(d) + ".log", "w") as log:
            subprocess.run(["rlhf-train", *overrides, *COMMON, f"hydra.run.dir={d}"], stdout=log,
                           stderr=subprocess.STDOUT, check=False)
        print(f"{table}: {name}: {' '.join(overrides)}: {final(d)}", flush=True)


def final(d: Path) -> float | None:
    s = d / "summary.json"
    return json.loads(s.read_text()).get("kl_to_optimum") if s.is_file() else None


def reached(d: Path, goal: float = 0.05) -> int | None:
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").is_file() else []
    return next((r["step"] for r in rows if r.get("eval/kl_to_optimum", 1e9) <= goal), None)


def mismatch(d: Path) -> float | None:
    """The run's median mismatch/kl (KL(q || pi) per token of the sampler), None when on-policy."""
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").is_file() else []
    got = [r["mismatch/kl"] for r in rows if "mismatch/kl" in r]
    return statistics.median(got) if got else None


def table(out: Path) -> None:
    cells: dict[tuple[str, str], list[tuple[float | None, int | None]]] = {}
    for t, name, overrides in runs():
        d = directory(out, t, overrides)
        cells.setdefault((t, name), []).append((final(d), reached(d)))
    for t, title in (("hard", "hard toys 0-4, beta 0.5, 600 steps of 128 rollouts"),
                     ("stale", "toy_sequences, beta 0.5, REINFORCE, seeds 0-2"),
                     ("vllm", "toy_sequences with one 32-dimension head, beta 0.5, REINFORCE, seeds 0-2")):
        print(f"\n{title}\n| configuration | runs | KL(pi || pi*) at the end, largest | median | reach 0.05 | "
              "median step reaching it | mismatch/kl, median |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for (tt, name), got in cells.items():
            if tt != t:
                continue
            kls = [k for k, _ in got if k is not None]
            steps = [s for _, s in got if s is not None]
            mis = [m for m in (mismatch(directory(out, t, o)) for tt2, n, o in runs() if tt2 == t and n == name)
                   if m is not None]
            print(f"| {name} | {len(got)} | {max(kls):.3g} | {statistics.median(kls):.3g} | {len(steps)} of {len(got)} | "
                  f"{statistics.median(steps) if steps else '-'} | {f'{statistics.median(mis):.2g}' if mis else '-'} |"
                  if kls else f"| {name} | {len(got)} | - | - | - | - | - |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("run", "table"))
    p.add_argument("out", type=Path)
    p.add_argument("--only", choices=("hard", "stale", "vllm"), help="run one table's runs (vllm: needs vLLM)")
    p.add_argument("--rows", help="and of it only these rows (their names, separated by ';')")
    args = p.parse_args()
    if args.what == "run":
        run(args.out, args.only, args.rows.split(";") if args.rows else None)
    table(args.out)


if __name__ == "__main__":
    main()
