"""Memory and step time of sharded training (parallel=fsdp) against one process and DDP.

    python benchmarks/fsdp.py [--steps 5] [--batch 8] [--tokens 64] [--layers 12] [--release-memory]

Full fine-tuning of a GPT-2-124M-shaped model (12 layers, 768 wide, vocabulary 50,257,
weights initialised at random: nothing is downloaded), through the project's own Policy:
its frozen reference copy, the trainable forward, the gradient step. Three layouts, each
started alone: one process (the whole global batch), 2 DDP ranks and 2 FSDP ranks (half
the batch each; torchrun, gloo on the CPU, NCCL on GPUs). Each runs `--steps` timed steps
after one untimed step (Adam's moments exist from then on), then reports per rank:

    weights, gradients, Adam   bytes of the trained tensors this rank holds (its shards under FSDP)
    reference                  bytes of the frozen reference copy this rank holds
    peak RSS                   the process's peak resident memory (activations, libraries, gathered
                               layers, and the whole model each rank builds before it is sharded)
    RSS end                    resident memory after the last sampling call (glibc keeps freed
                               blocks for reuse, so it overstates live memory unless --release-memory)
    step                       median seconds of one step (forward, backward, Adam)
    sample                     median seconds of sampling `--sample-tokens` tokens for this rank's rows

and the ratios: FSDP's per-rank trained-state bytes over one process's (the sharded part:
1/2 on 2 ranks, plus the padding of each shard to a whole row), FSDP's step over DDP's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf.contracts.schema import LoraSettings
    from rlhf.core.loop.optim import adam, gradient_step
    from rlhf.core.model.policy import Policy
    from rlhf.core.parallel import distributed, sharding
    from rlhf.core.rollout import sampling
    from rlhf.embedded.build import policy_path

    distributed.setup()
    torch.set_num_threads(args.threads)
    device = distributed.pick_device("auto")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = GPT2LMHeadModel(config)
    tokenizer = AutoTokenizer.from_pretrained(policy_path())  # padding only: the batch is token ids
    sharded = args.layout == "fsdp"  # on the CPU first, as the trainer does: only the shards reach the device
    policy = Policy.from_model(model, tokenizer, LoraSettings(enabled=False), torch.device("cpu") if sharded else device)
    if sharded:
        policy.enable_sharding(device)
    elif args.layout == "ddp":
        policy.enable_data_parallel()
    params = list(policy.trainable_parameters())
    opt = adam(params, lr=1e-5)

    start, stop = distributed.shard(args.batch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (args.batch, 2 * args.tokens), generator=g)[start:stop].to(device)
    mask = torch.ones_like(ids)
    policy.train()

    def step() -> float:
        t = time.perf_counter()
        logprobs, _, _ = policy.token_logprobs(ids, mask, args.tokens, with_values=False)
        with torch.no_grad():
            ref = policy.reference_logprobs(ids, mask, args.tokens)
        loss = distributed.loss_mean(logprobs - ref, torch.ones_like(logprobs))  # a REINFORCE-shaped objective
        gradient_step(opt, params, -loss, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    step()
    times = [step() for _ in range(args.steps)]
    grads = [p.grad for p in params if p.grad is not None]  # (freed by the next zero_grad: counted now)

    def sample() -> float:  # sharded: the whole model gathered for the loop, then freed
        t = time.perf_counter()
        sampling.generate(policy, queries, {"max_new_tokens": args.sample_tokens, "do_sample": True},
                         rows=(start, args.batch))
        return time.perf_counter() - t

    queries = [row.tolist() for row in ids[:, : args.tokens]]
    sample()
    sample_times = [sample() for _ in range(2)]

    def nbytes(tensors) -> int:
        return sum(sharding.local(t).numel() * t.element_size() for t in tensors)

    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    ref_params = list(policy._ref_model.parameters()) if policy._ref_model is not None else []
    row = {
        "rank": distributed.rank(),
        "weights": nbytes(params),
        "grads": nbytes(grads),
        "adam": nbytes(state),
        "reference": nbytes(ref_params),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_end": int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE"),
        "step_s": statistics.median(times),
        "sample_s": statistics.median(sample_times),
    }
    rows = distributed.gather_objects(row)
    if distributed.is_main():
        Path(args.out).write_text(json.dumps(rows))


def run(layout: str, args: argparse.Namespace, out: Path) -> list[dict]:
    common = ["--worker", "--layout", layout, "--steps", str(args.steps), "--batch", str(args.batch),
              "--tokens", str(args.tokens), "--layers", str(args.layers), "--sample-tokens", str(args.sample_tokens),
              "--out", str(out)]
    if layout == "one":
        cmd = [sys.executable, __file__, *common, "--threads", str(args.threads_one)]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        cmd = [torchrun, "--standalone", "--nproc_per_node=2", __file__, *common, "--threads", "1"]
    t = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.release_memory:  # every block over 1 MiB mmapped, so a freed tensor leaves the resident set at once
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    subprocess.run(cmd, check=True, env=env)
    print(f"  {layout}: {time.time() - t:.0f} s", flush=True)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="one", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads-one", type=int, default=1, help="torch threads of the one-process run (each rank has 1)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="global batch (rows); each of 2 ranks takes half")
    p.add_argument("--tokens", type=int, default=64, help="prompt and response length each")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--sample-tokens", type=int, default=16, help="new tokens per sampled response")
    p.add_argument("--release-memory", action="store_true",
                   help="glibc returns freed tensors to the system at once (RSS then follows live memory; steps are slower)")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("one", "ddp", "fsdp"):
            results[layout] = run(layout, args, Path(tmp) / f"{layout}.json")
    def mib(b):
        return f"{b / 2**20:8.1f}"
    print(f"\nfull fine-tuning, GPT-2-124M shape ({args.layers} layers), global batch {args.batch} x "
          f"{2 * args.tokens} tokens, median of {args.steps} steps")
    print(f"{'layout':8} {'rank':>4} {'weights':>8} {'grads':>8} {'Adam':>8} {'trained':>8} {'ref':>8} "
          f"{'peakRSS':>8} {'RSS end':>8} {'step s':>7} {'sample s':>8}   (MiB)")
    for layout, rows in results.items():
        for r in rows:
            trained = r["weights"] + r["grads"] + r["adam"]
            print(f"{layout:8} {r['rank']:>4} {mib(r['weights'])} {mib(r['grads'])} {mib(r['adam'])} {mib(trained)} "
                  f"{mib(r['reference'])} {mib(r['peak_rss'])} {mib(r['rss_end'])} {r['step_s']:7.2f} {r['sample_s']:8.2f}")
    trained = {k: max(r["weights"] + r["grads"] + r["adam"] for r in rows) for k, rows in results.items()}
    rss = {k: max(r["peak_rss"] for r in rows) for k, rows in results.items()}
    step = {k: max(r["step_s"] for r in rows) for k, rows in results.items()}  # a step ends when its slowest rank does
    sample = {k: max(r["sample_s"] for r in rows) for k, rows in results.items()}
    end = {k: max(r["rss_end"] for r in rows) for k, rows in results.items()}
    print(f"\nper-rank trained state (weights + grads + Adam), FSDP / one process: {trained['fsdp'] / trained['one']:.3f}")
    print(f"per-rank trained state, DDP / one process:                          {trained['ddp'] / trained['one']:.3f}")
    print(f"per-rank peak RSS, FSDP / DDP:                                      {rss['fsdp'] / rss['ddp']:.3f}")
    print(f"per-rank RSS at the end, FSDP / DDP:                                {end['fsdp'] / end['ddp']:.3f}")
    print(f"step time, FSDP / DDP (same global batch, 2 ranks):                 {step['fsdp'] / step['ddp']:.3f}")
    print(f"sampling time, FSDP / DDP (whole model gathered once per call):     {sample['fsdp'] / sample['ddp']:.3f}")


if __name__ == "__main__":
    main()
