"""Peak memory of a PPO step as the vocabulary grows: chunked log-probs against full logits.

One PPO step on a batch of 32 responses of 64 tokens (after 8-token queries): the policy's
log-probs and values and the reference's log-probs of the batch (what rollout collection
computes after sampling), then one PPO update on the whole batch (one epoch, one
minibatch, so the update sees all 32 x 64 positions at once). The trunk is the same tiny
Qwen2-style model (2 layers, 64 wide, LoRA on every linear layer) with the output layer at
1k, 32k and 152k rows (Qwen2's 151,936). Variants, each in its own fresh process:

- `chunked`: this project (`Policy.token_logprobs`): the vocabulary projection a chunk of
  positions at a time under activation checkpointing; no (B, T, V) tensor is kept;
- `full logits`: the same step with `policy.chunked_logprobs=false`: the model's (B, T, V)
  logits, then log_softmax and gather (what this project did before);
- `TRL utilities`: the model's full logits, then TRL's `selective_log_softmax` for the
  log-probs and its chunked `entropy_from_logits` for the entropy, as TRL's trainers
  compute them (trl.trainer.utils, the pinned test extra);
- `chunked + gradient checkpointing`: `policy.gradient_checkpointing=true` as well.

The figure is the peak resident memory during a second step above the resident memory
before it (sampled every 0.2 ms by a thread), in MiB, and that step's wall time; medians
over `--repeats` processes. The first step is run and not measured (it pays one-time
allocations), and glibc is told to map every allocation of 128 KiB or more on its own
(`MALLOC_MMAP_THRESHOLD_`), so a freed tensor leaves the resident set and the figure
follows the live tensors rather than the allocator's caching.

    python benchmarks/vocab_memory.py [--repeats 3] [--vocab 1024 32768 151936]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

VARIANTS = ("chunked", "full logits", "TRL utilities", "chunked + gradient checkpointing")
B, Q, T = 32, 8, 64


def measure(variant: str, vocab: int) -> dict[str, float]:
    """In a child process: (peak MiB above the step's start, seconds) of one PPO step."""
    import psutil
    import torch

    from rlhf.contracts.interfaces import Rollout
    from rlhf.contracts.registry import discover
    from rlhf.contracts.schema import PolicyConfig
    from rlhf.core.model.policy import Policy
    from rlhf.embedded.chat_models import build_chat_model

    discover()
    from rlhf_plugins.optimizers.ppo import PPO

    from rlhf.core.loop.update import Updater

    torch.manual_seed(0)
    torch.set_num_threads(2)
    path = build_chat_model("qwen2", tempfile.mkdtemp(), vocab_size=vocab)
    policy = Policy.load(PolicyConfig(path=str(path), chunked_logprobs=variant != "full logits" and variant != "TRL utilities",
                                      gradient_checkpointing="gradient" in variant), torch.device("cpu"))
    policy.attach_value_head()
    if variant == "TRL utilities":
        _use_trl_utilities(policy)
    ppo = Updater(PPO(PPO.Config(epochs=1, num_minibatches=1)), policy)
    ids = torch.randint(0, vocab, (B, Q + T))
    attn = torch.ones_like(ids)
    mask = torch.ones(B, T)

    def step() -> None:
        with torch.no_grad():
            logprobs, values, _ = policy.token_logprobs(ids, attn, Q, 1.0)
            ref = policy.reference_logprobs(ids, attn, Q, 1.0)
        r = Rollout(input_ids=ids, attention_mask=attn, query_len=Q, mask=mask, logprobs=logprobs, ref_logprobs=ref,
                    values=values, scores=torch.randn(B), queries=[""] * B, responses=[""] * B)
        ppo.step(r)

    step()  # once first: one-time allocations (thread pools, the allocator's arenas) are not the step's
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    return {"peak_mib": (peak[0] - base) / 2**20, "seconds": seconds}


def _use_trl_utilities(policy) -> None:
    """The policy's log-probs and entropy as TRL computes them: full logits, then its utilities."""
    import torch
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    def token_logprobs(ids, attn, q, temperature=1.0, with_values=True, with_entropy=False):
        logits, values = policy.forward(ids, attn, q, with_values)
        logprobs = selective_log_softmax(logits, ids[:, q:], temperature)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = entropy_from_logits(logits / temperature)
        return logprobs, values, entropy

    def reference_logprobs(ids, attn, q, temperature=1.0):
        with torch.no_grad():
            return selective_log_softmax(policy.reference_logits(ids, attn, q), ids[:, q:], temperature)

    policy.token_logprobs, policy.reference_logprobs = token_logprobs, reference_logprobs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, nargs="+", default=[1024, 32768, 151936])
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return
    print(f"PPO step, batch {B} x {T} response tokens (+{Q} query), tiny Qwen2-style trunk; peak RSS above the "
          f"step's start, median of {args.repeats} processes\n")
    print("| vocabulary | " + " | ".join(VARIANTS) + " |")
    print("| ---: | " + " | ".join("---:" for _ in VARIANTS) + " |")
    for vocab in args.vocab:
        cells, chunked = [], None
        for variant in VARIANTS:
            runs = []
            for _ in range(args.repeats):
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                out = subprocess.run([sys.executable, __file__, "--child", variant, str(vocab)], capture_output=True,
                                     text=True, check=True, env=env).stdout.strip().splitlines()[-1]
                runs.append(json.loads(out))
            mib = statistics.median(r["peak_mib"] for r in runs)
            sec = statistics.median(r["seconds"] for r in runs)
            chunked = chunked or mib
            cells.append(f"{mib:,.0f} MiB ({mib / chunked:.1f}x), {sec:.2f} s")
        print(f"| {vocab:,} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
