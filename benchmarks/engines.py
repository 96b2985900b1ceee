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
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import B as PROMPTS  # noqa: E402  (the same models, Trainer set-up and TRL set-up as bench.py)
from bench import gpt2_path, model_path, ours, prompt_texts, timed, trl_online  # noqa: E402

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


MODELS = {  # the step table's models: (layers, width, vocabulary; None: the embedded tokenizer's)
    "gpt2-87m": (12, 768, None),  # GPT-2 124M's trunk on the embedded tokenizer's vocabulary (87M parameters)
    "gpt2-124m": (12, 768, 50257),  # GPT-2 124M's shape, its real vocabulary
}
OPTIMIZERS = {"ppo": ["optimizer=ppo"], "grpo": ["optimizer=grpo"], "rloo": ["optimizer=rloo"], "dm": ["optimizer=dm"]}
CONFIGS = {  # the float32 core loop as the presets run it, then each faster path
    "core": ["proposal=policy", "precision=fp32"],
    "core-bf16": ["proposal=policy", "precision=bf16"],
    "vllm-float32": ["proposal=vllm", "proposal.dtype=float32", "precision=fp32"],
    "vllm-float32-bypass": ["proposal=vllm", "proposal.dtype=float32", "proposal.bypass=true", "precision=fp32"],
    "vllm-bfloat16": ["proposal=vllm", "proposal.dtype=bfloat16", "precision=fp32"],
    "vllm-bfloat16+core-bf16": ["proposal=vllm", "proposal.dtype=bfloat16", "precision=bf16"],
}


def step_model(name: str, out: Path) -> str:
    """The embedded default, or a randomly initialised GPT-2 of MODELS (its output layer tied,
    as GPT-2's is, 1,024 positions), on the embedded tokenizer (its ids are below either vocabulary)."""
    if name == "embedded":
        return model_path("embedded", out)
    layers, width, vocab = MODELS[name]
    return gpt2_path(out / name, layers, width, vocab, positions=1024)


def one_step(t) -> dict:
    """A training step as `rlhf-train` runs it: the batch and the update, then the engine's sync
    (which the run does after the step: its seconds added as time/sync_s)."""
    row = t.train_step()
    if not t.proposal.is_policy:
        t0 = time.perf_counter()
        t.proposal.after_update(t.policy)
        row["time/sync_s"] = time.perf_counter() - t0
        row["time/step_s"] += row["time/sync_s"]
    return row


def step_table(models: list[str], optimizers: list[str], configs: list[str], rounds: int, out: Path) -> dict:
    """{model: {optimizer: {config: median step seconds, "<config>/phases": {phase: median s}}}}:
    every configuration of a (model, optimizer) built side by side in one process, then
    `rounds` alternating rounds of one step each, after one warm-up step each (an engine's
    first batch included)."""
    table: dict = {}
    for name in models:
        path = step_model(name, out)
        for opt in optimizers:
            trainers = {}
            for c in configs:
                try:
                    trainers[c] = ours(path, *OPTIMIZERS[opt], *CONFIGS[c], "eval.every=100000", "threads=" +
                                       str(torch.get_num_threads()))
                    one_step(trainers[c])
                except ValueError as e:  # a configuration this machine cannot run (an engine's refusal)
                    print(f"{name} {opt} {c}: {str(e).splitlines()[0]}", file=sys.stderr)
                    trainers.pop(c, None)
            times: dict[str, list[dict]] = {c: [] for c in trainers}
            for _ in range(rounds):
                for c, t in trainers.items():
                    times[c].append(one_step(t))
            row: dict = {}
            for c, rows in times.items():
                row[c] = round(statistics.median(r["time/step_s"] for r in rows), 4)
                phases = sorted({k for r in rows for k in r if k.startswith("time/") and k != "time/step_s"})
                row[f"{c}/phases"] = {k.removeprefix("time/").removesuffix("_s"): round(statistics.median(r.get(k, 0.0)
                                      for r in rows), 4) for k in phases}
            table.setdefault(name, {})[opt] = row
            print_row(name, opt, row)
            for t in trainers.values():  # the engines let go now, before the next optimizer's are built
                getattr(t.proposal, "close", lambda: None)()
            del trainers, t
            gc.collect()
    return table


def trl_colocated(name: str, out: Path, rounds: int) -> dict:
    """TRL's GRPOTrainer with its own colocated vLLM (use_vllm=True, vllm_mode="colocate") on the
    same model, prompts, reward and schedule as our GRPO step (32 prompts x 4, one step a
    generation, LoRA, float32): its step seconds, median over `rounds` steps after a warm-up;
    or, where it does not run here, the exception and the TRL line that raised it."""
    import traceback

    path = step_model(name, out)
    mine = ours(path, "optimizer=grpo")
    prompts = prompt_texts(mine, 512)
    schedule = dict(per_device_train_batch_size=PROMPTS * 4, steps_per_generation=1, num_iterations=1, num_generations=4,
                    use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)
    try:
        trainer, clock = trl_online("grpo", path, prompts, mine.reward, rounds + 1,
                                    mine.torch_optimizer.param_groups[0]["lr"], **schedule)
        trainer.train()
    except Exception as e:  # noqa: BLE001  (what stops it is the finding)
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/trl/" in f.filename]
        where = f" at {frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno} ({frames[-1].line})" if frames \
            else ""
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"}
    return {"trl-grpo-vllm-colocate": round(statistics.median(clock.steps()[1:]), 4)}


def print_row(model: str, opt: str, row: dict) -> None:
    base = row.get("core")
    cells = []
    for c in CONFIGS:
        if c in row:
            ratio = f" ({row[c] / base:.2f}x)" if base else ""
            cells.append(f"{row[c]:.3f}{ratio}")
        else:
            cells.append("-")
    print(f"| {model} | {opt} | " + " | ".join(cells) + " |", flush=True)
    for c in CONFIGS:
        if f"{c}/phases" in row:
            split = ", ".join(f"{k} {v:.3f}" for k, v in row[f"{c}/phases"].items() if v >= 0.0005)
            print(f"|  |  {c}: {split} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sampling", default="", help="the sampling table's models too: embedded, tiny, small, medium")
    p.add_argument("--models", default="embedded,gpt2-87m,gpt2-124m", help="the step table's: embedded, gpt2-87m, gpt2-124m")
    p.add_argument("--optimizers", default="ppo,grpo,rloo,dm")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of one step of every configuration")
    p.add_argument("--json", action="store_true", help="end with the step table as one JSON object")
    p.add_argument("--trl", action="store_true", help="and TRL's GRPOTrainer with its colocated vLLM, on each model")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        for name in filter(None, args.sampling.split(",")):
            generation(name, Path(out), args.rounds)
        print(f"\none step end to end (the presets' defaults: 32 prompts, 24 new tokens), seconds, median of "
              f"{args.rounds} alternating rounds, {torch.get_num_threads()} threads; (x: against core)")
        print("| model | optimizer | " + " | ".join(CONFIGS) + " |\n| --- | --- |" + " ---: |" * len(CONFIGS))
        table = step_table([m for m in args.models.split(",") if m], args.optimizers.split(","), args.configs.split(","),
                           args.rounds, Path(out))
        if args.trl:
            for name in filter(None, args.models.split(",")):
                got = trl_colocated(name, Path(out), args.rounds)
                table.setdefault(name, {}).setdefault("grpo", {}).update(got)
                said = f"does not run: {got['error']}" if "error" in got else f"{got['trl-grpo-vllm-colocate']:.3f} s a step"
                print(f"TRL GRPOTrainer, vllm_mode=colocate, {name}: {said}")
    if args.json:
        print(json.dumps(table))


if __name__ == "__main__":
    main()
