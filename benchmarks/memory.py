"""Resident memory of policy + reference + value head: LoRA-shared reference vs a full copy,
and what a colocated vLLM engine adds (its own copy of the weights and its KV cache).

Each variant is measured in its own fresh process on a randomly initialised GPT-2 (124M)
policy: RSS after the imports (the baseline) and after building the models and running one
forward pass of the policy and one of the reference (and, for the engine's rows, building
vLLM's engine from it: proposal=vllm with a 256 MiB KV cache). The figure is the difference,
the memory the models need; ratios are against the policy alone. The engine's rows also say
what `proposal=vllm` estimates before it builds (the estimate it refuses a run on).

    python benchmarks/memory.py [--repeats 3] [--no-engine]
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
    "policy + reference + value head, LoRA, + vLLM engine float32 (KV cache 256 MiB)": "engine-float32",
    "policy + reference + value head, LoRA, + vLLM engine bfloat16 (KV cache 256 MiB)": "engine-bfloat16",
}
ENGINE_KV_MB = 256


def measure(variant: str) -> dict:
    """Run in a child process: MiB of RSS the variant adds over the imports."""
    import psutil
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf.contracts.schema import LoraSettings
    from rlhf.core.model.policy import Policy
    from rlhf.embedded.build import policy_path

    tokenizer = AutoTokenizer.from_pretrained(policy_path())  # any tokenizer: ids < vocab size
    torch.manual_seed(0)
    if variant.startswith("engine-"):  # vLLM's modules before the baseline: the figure is the engine's, not its import's
        from rlhf_plugins.proposals.vllm import engine_output_kept

        with engine_output_kept():
            import vllm  # noqa: F401
    proc = psutil.Process()
    base = proc.memory_info().rss
    model = GPT2LMHeadModel(GPT2Config())  # 124M parameters, fp32
    ids = torch.randint(0, 1000, (4, 32))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        if variant == "policy":
            model.eval()(input_ids=ids)
        else:
            policy = Policy.from_model(model, tokenizer, LoraSettings(enabled=variant != "full"), torch.device("cpu"))
            policy.attach_value_head()
            policy.forward(ids, mask, 8)
            policy.reference_logits(ids, mask, 8)
    if variant.startswith("engine-"):
        from rlhf_plugins.proposals.vllm import VLLM, engine_bytes

        from rlhf.contracts.interfaces import Sampling

        dtype = variant.removeprefix("engine-")
        engine = VLLM(VLLM.Config(dtype=dtype, kv_cache_mb=ENGINE_KV_MB))
        engine.start(policy, Sampling(1.0, {"do_sample": True, "max_new_tokens": 24}))
        return {"rss": (proc.memory_info().rss - base) / 2**20,
                "estimate": sum(engine_bytes(policy, dtype, ENGINE_KV_MB).values()) / 2**20}
    return {"rss": (proc.memory_info().rss - base) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--no-engine", action="store_true", help="leave out the engine's rows (vLLM not installed)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_engine and v.startswith("engine-"))}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every variant
        for label, variant in variants.items():
            out = subprocess.run([sys.executable, __file__, "--child", variant], capture_output=True, text=True, check=True)
            results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    alone = statistics.median(r["rss"] for r in results["policy alone"])
    lora = statistics.median(r["rss"] for r in results["policy + reference + value head, LoRA"])
    print(f"GPT-2 124M (random init, fp32), CPU, median of {args.repeats} fresh processes each")
    print("| variant | RSS MiB | vs policy alone | the engine's share (over LoRA) | proposal=vllm's estimate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, values in results.items():
        med = statistics.median(r["rss"] for r in values)
        engine = f"{med - lora:.0f}" if "estimate" in values[0] else ""
        estimate = f"{values[0]['estimate']:.0f}" if "estimate" in values[0] else ""
        print(f"| {label} | {med:.0f} | {med / alone:.2f}x | {engine} | {estimate} |")


if __name__ == "__main__":
    main()
