"""The diagnoser as a classifier: runs made to fail in known ways, healthy runs, and what
rlhf-diagnose says of each (the confusion table in the README).

    python benchmarks/diagnose.py [out_dir] [--jobs 2] [--steps 60]

Every run is `rlhf-train` on the embedded default with the overrides below (one torch thread
each, `--jobs` at a time). A planted pathology counts as found when one of its expected
findings is named; any finding on a healthy run is a false finding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

JUDGES = "eval.judges=[lexicon]"  # an independent judge on every run (VADER: no model, no training)
HARD = ["+experiment=hard_toys", "reward.seed=3", "eval.judges=[]"]  # the toys: no text for a judge to read
SEQUENCES = ["+experiment=toy_sequences", "eval.judges=[]"]

PLANTED = {  # name: (overrides, the findings that name it)
    "lr x100 (ppo 3e-2)": (["optimizer.lr=3e-2"], {"unstable: steps too large"}),
    "lr /1000 (ppo 3e-7)": (["optimizer.lr=3e-7"], {"stagnation: steps too small"}),
    "beta 0 (ppo)": (["optimizer.beta=0"], {"KL blow-up", "reward hacking"}),
    "beta 10 (ppo)": (["optimizer.beta=10"], {"over-regularisation"}),
    "reward any positive word satisfies (lexicon, beta 0)": (
        ["reward=lexicon", "optimizer.beta=0", "eval.judges=[sentiment]"], {"reward hacking"}),
    "sampler top_k=2": (["sampler.top_k=2"], {"biased KL estimate"}),
    "dpo lr x100 (2e-2)": (["optimizer=dpo", "optimizer.lr=2e-2"],
                           {"DPO likelihood displacement", "DPO margin saturated", "KL blow-up", "reward hacking"}),
    # the proposals' findings, on the toys whose optimum is known
    "ppo in the hard toy's trap (reward.seed=3)": ([*HARD, "train.steps=600", "eval.every=50"],
                                                   {"exploration trap: better responses sampled, not learned"}),
    "explore T=3 uncorrected (reinforce)": ([*SEQUENCES, "optimizer=reinforce", "proposal=explore", "proposal.temperature=3",
                                             "train.steps=200", "eval.every=20"], {"sampler-trainer mismatch"}),
}

HEALTHY = {f"{opt} seed {seed}": [f"optimizer={opt}", f"seed={seed}"]
           for opt, seeds in (("ppo", (0, 1)), ("grpo", (0, 1)), ("rloo", (0, 1)), ("reinforce", (0,)), ("a2c", (0,)),
                              ("dpo", (0, 1))) for seed in seeds}
# the documented recipes, run as the docs give them: zero findings on each
HEALTHY.update({
    "recipe: dm on an exploring proposal, hard toy 3": [*HARD, "optimizer=dm", "optimizer.lr=3e-3", "train.batch_size=16",
                                                        "proposal=explore", "proposal.temperature=2", "train.steps=600",
                                                        "eval.every=50"],
    "recipe: reinforce, explore T=2 + sequence": [*SEQUENCES, "optimizer=reinforce", "optimizer.beta=0.5", "proposal=explore",
                                                  "proposal.temperature=2", "optimizer.correction=sequence",
                                                  "train.steps=600", "eval.every=50"],
    "recipe: ppo on the toy bandit, beta 0.5": ["+experiment=toy_bandit", "eval.judges=[]", "optimizer.beta=0.5",
                                                "train.steps=600", "eval.every=50"],
})


def train(out: Path, name: str, overrides: list[str], steps: int) -> tuple[str, float]:
    run = out / "".join(c if c.isalnum() else "_" for c in name.split(" (")[0].replace("/", "div"))
    t0 = time.time()
    if (run / "summary.json").is_file():  # done by an earlier call
        return str(run), json.loads((run / "summary.json").read_text())["wall_s"]
    args = [*overrides] if any(o.startswith("eval.judges") for o in overrides) else [*overrides, JUDGES]
    r = subprocess.run(["rlhf-train", f"hydra.run.dir={run}", f"train.steps={steps}", "eval.every=10", "threads=1", *args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
    return str(run), time.time() - t0


def findings(run: str) -> list[str]:
    r = subprocess.run(["rlhf-diagnose", run, "--json"], capture_output=True, text=True, check=True)
    return [f["name"] for f in json.loads(r.stdout.splitlines()[0])["findings"]]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="diagnose_runs")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--only", default="", help="only the cases whose name holds this text")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [(n, o, e) for n, (o, e) in PLANTED.items()] + [(n, o, set()) for n, o in HEALTHY.items()]
    cases = [c for c in cases if args.only in c[0]]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda c: train(out, c[0], c[1], args.steps), cases))
    found_planted = false_healthy = 0
    print("| run | planted | expected finding | found | rlhf-diagnose says |")
    print("| --- | --- | --- | --- | --- |")
    for (name, _, expected), (run, _) in zip(cases, runs):
        said = findings(run)
        if expected:
            hit = bool(expected & set(said))
            found_planted += hit
            verdict = "yes" if hit else "NO"
            print(f"| {name} | yes | {' or '.join(sorted(expected))} | {verdict} | {'; '.join(said) or 'no findings'} |")
        else:
            false_healthy += bool(said)
            print(f"| {name} | no | none | {'FALSE FINDING' if said else 'no findings'} | {'; '.join(said) or 'no findings'} |")
    planted = sum(bool(e) for _, _, e in cases)
    print(f"\nplanted pathologies named: {found_planted} of {planted}; healthy runs with a false finding: "
          f"{false_healthy} of {len(cases) - planted}; wall {sum(w for _, w in runs):.0f} s of runs")


if __name__ == "__main__":
    main()
