"""Resident memory of policy + reference + value head: LoRA-shared reference vs a full copy.

Each variant is measured in its own fresh process on a randomly initialised GPT-2 (124M)
policy: RSS after the imports (the baseline) and after building the models and running one
forward pass of the policy and one of the reference. The figure is the difference, the
memory the models need; ratios are against the policy alone.

    python benchmarks/memory.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

VARIANTS = {
    "policy alone": "policy",
    "policy + reference + value head, LoRA": "lora",
    "policy + reference + value head, full copy (policy.lora.enabled=false)": "full",
}


def measure(variant: str) -> float:
    """Run in a child process: MiB of RSS the variant adds over the imports."""
    import psutil
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf.contracts.schema import LoraSettings
    from rlhf.core.model.policy import Policy
    from rlhf.embedded.build import policy_path

    tokenizer = AutoTokenizer.from_pretrained(policy_path())  # any tokenizer: ids < vocab size
    torch.manual_seed(0)
    proc = psutil.Process()
    base = proc.memory_info().rss
    model = GPT2LMHeadModel(GPT2Config())  # 124M parameters, fp32
    ids = torch.randint(0, 1000, (4, 32))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if variant == "policy":
            model.eval()(input_ids=ids)
        else:
            policy = Policy.from_model(model, tokenizer, LoraSettings(enabled=variant == "lora"), torch.device("cpu"))
            policy.attach_value_head()
            policy.forward(ids, mask, 8)
            policy.reference_logits(ids, mask, 8)
    return (proc.memory_info().rss - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    results: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every variant
        for label, variant in VARIANTS.items():
            out = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True, check=True)
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    alone = statistics.median(results["policy alone"])
    print(f"GPT-2 124M (random init, fp32), CPU, median of {args.repeats} fresh processes each")
    print(f"{'variant':<74} {'RSS MiB':>8} {'ratio':>6}")
    for label, values in results.items():
        med = statistics.median(values)
        print(f"{label:<74} {med:8.0f} {med / alone:6.2f}x")


if __name__ == "__main__":
    main()
