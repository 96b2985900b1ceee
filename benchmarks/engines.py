"""Rollout engines side by side in one process: the core's sampling loop, vLLM (float32 and
bfloat16) and transformers' `generate`, on the embedded default and a GPT-2-124M-shaped model.

    python benchmarks/engines.py                       # both models, 5 rounds
    python benchmarks/engines.py --models embedded --rounds 3 --steps 4

Generation: a batch of 64 queries x up to 64 new tokens (sampling at temperature 1, each
response ending at its EOS: the random-init GPT-2 almost never draws it, the embedded model
often does), each round times one batch of every engine in turn; tokens per second count the
tokens each engine generated, medians over the rounds, ratios against the core's loop (above
1 is faster). vLLM's engine is built once per model and dtype (its load time is
printed) and warmed up with one batch; a weight sync (the policy's merged weights pushed in
place, what proposal=vllm does after every update) is timed `--rounds` times. End to end: one
PPO and one GRPO step on the embedded default (train.batch_size 32, 24 new tokens, the main
job's shape) with the core's loop and with vLLM drawing the rollouts, medians over `--steps`
steps after a warm-up step. The same script runs on a GPU (device auto).

Needs vLLM (pip install -c constraints.txt -e '.[vllm]'; README "vLLM as the rollout engine").
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import model_path, ours, timed  # noqa: E402  (the same models and Trainer set-up as bench.py)

B, NEW = 64, 64


def queries(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, min(vocab, 1000), (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def loop_engine(policy, gen):
    from rlhf.core.rollout import sampling

    def run(qs):
        return int(sampling.generate(policy, qs, gen).mask.sum())
    return run


def generate_engine(policy, gen):
    from rlhf.core.rollout import sampling

    def run(qs):
        ids, mask = sampling.pad_left(qs, policy.tokenizer.pad_token_id, policy.device)
        with torch.no_grad():
            out = policy.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW,
                                        pad_token_id=policy.tokenizer.pad_token_id, eos_token_id=policy.eos_ids or None)
        return int(sampling.response_mask(out[:, ids.shape[1]:], policy.eos_ids).sum())
    return run


def vllm_engine(policy, gen, dtype: str):
    from rlhf_plugins.proposals.vllm import VLLM

    engine = VLLM(VLLM.Config(dtype=dtype, kv_cache_mb=1024))
    load = timed(lambda: engine.start(policy, gen))

    def run(qs):
        return int(engine.sample(policy, qs, gen, 1.0, False, None).mask.sum())
    return engine, run, load


def generation(name: str, out: Path, rounds: int) -> None:
    path = model_path(name, out)
    t = ours(path, "proposal=policy", f"sampler.max_new_tokens={NEW}")
    policy = t.policy
    gen = {**t.sampler.generation_kwargs(), "max_new_tokens": NEW}
    qs = queries(B, policy.vocab_size)
    engines = {"core loop": loop_engine(policy, gen), "transformers generate": generate_engine(policy, gen)}
    loads, syncs, keep = {}, {}, []
    for dtype in ("float32", "bfloat16"):
        engine, run, loads[dtype] = vllm_engine(policy, gen, dtype)
        keep.append(engine)
        engines[f"vLLM {dtype}"] = run
    times: dict[str, list[float]] = {k: [] for k in engines}
    for run in engines.values():  # warm-up
        run(qs)
    for _ in range(rounds):
        for k, run in engines.items():
            t0 = time.perf_counter()
            tokens = run(qs)
            times[k].append(tokens / (time.perf_counter() - t0))
    for engine, dtype in zip(keep, ("float32", "bfloat16")):
        syncs[dtype] = statistics.median(engine.after_update(policy)["proposal/sync_s"] for _ in range(rounds))
    base = statistics.median(times["core loop"])
    params = sum(p.numel() for p in policy.model.parameters()) / 1e6
    print(f"\n{name} ({params:.0f}M parameters), batch {B} x {NEW} new tokens, {rounds} rounds, "
          f"device {policy.device.type}, {torch.get_num_threads()} threads")
    print("| engine | tokens/s (median) | against the core loop |\n| --- | ---: | ---: |")
    for k, xs in times.items():
        print(f"| {k} | {statistics.median(xs):,.0f} | {statistics.median(xs) / base:.2f}x |")
    for dtype in loads:
        print(f"vLLM {dtype}: engine built in {loads[dtype]:.1f} s, a weight sync {1000 * syncs[dtype]:.1f} ms (median)")
    del keep, engines
    gc.collect()


def steps(n: int) -> None:
    print(f"\none step end to end on the embedded default (32 rollouts x 24 new tokens), median of {n}")
    print("| optimizer | core loop (s) | vLLM float32 (s) | vLLM / core |\n| --- | ---: | ---: | ---: |")
    for opt in ("ppo", "grpo"):
        got = {}
        for proposal in ("policy", "vllm"):
            t = ours("embedded", f"optimizer={opt}", f"proposal={proposal}", "eval.every=1000")
            t.train_step()  # warm-up (and the engine's first batch)
            xs = []
            for _ in range(n):
                xs.append(timed(t.train_step))
            got[proposal] = statistics.median(xs)
            del t
            gc.collect()
        print(f"| {opt} | {got['policy']:.3f} | {got['vllm']:.3f} | {got['vllm'] / got['policy']:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="embedded,medium", help="embedded, tiny, small, medium (GPT-2 124M's shape)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        for name in args.models.split(","):
            generation(name, Path(out), args.rounds)
    steps(args.steps)


if __name__ == "__main__":
    main()
