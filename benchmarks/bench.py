"""Speed of rlhf against TRL and against bare PyTorch, side by side in one process.

    python benchmarks/bench.py                 # every section, on the embedded default
    python benchmarks/bench.py --sections dpo,online --rounds 5
    python benchmarks/bench.py --model small   # a 6-layer, 384-wide GPT-2 (random init)

Sections (each prints its own table; ratios are ours / theirs, below 1 is faster):
  dpo      one DPO step (forward, backward, Adam) against TRL's DPOTrainer
  online   one PPO step per generated token against TRL's GRPOTrainer and RLOOTrainer doing
           the same generation and update work, and GRPO/RLOO against their TRL namesakes
  limit    one REINFORCE step against the same step written as bare PyTorch
  memory   resident memory of a LoRA-shared reference against a full copy (benchmarks/memory.py)
  scaling  PPO step time against batch size and response length

Both sides of a comparison use the same model, tokenizer, LoRA adapters (r 8, alpha 16,
peft's default targets), prompts, reward (the sentiment pipeline; a plain function for TRL),
batch size, response cap, learning rate and float32 on the same device. Timed steps come in
rounds, ours then theirs, each round after a warm-up step; figures are medians over all
timed steps. TRL's step time is measured between the starts of consecutive steps of its own
training loop, logging included (it logs every step, as we do).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest.compose: the config exactly as rlhf-train composes it

B, T = 32, 24  # rollouts per step and response cap of the main job's defaults


# ---------------------------------------------------------------------------- helpers


def median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_path(name: str, out: Path) -> str:
    """The embedded default, or a randomly initialised GPT-2 on its tokenizer: tiny (its shape,
    2 x 128), small (6 x 384) or medium (12 x 768, GPT-2 124M's trunk)."""
    from rlhf.embedded.build import policy_path

    if name == "embedded":
        return policy_path()
    layers, width = {"tiny": (2, 128), "small": (6, 384), "medium": (12, 768)}[name]
    return gpt2_path(out / name, layers, width)


def gpt2_path(path: Path, layers: int, width: int, vocab: int | None = None, positions: int = 256) -> str:
    """A randomly initialised GPT-2 (heads of 64 dimensions, its output layer tied) saved at
    `path` with the embedded tokenizer, whose ids are below any vocabulary of at least its size
    (`vocab`: the tokenizer's by default)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf.embedded.build import policy_path

    tok = AutoTokenizer.from_pretrained(policy_path())
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab or len(tok), n_positions=positions, n_layer=layers, n_embd=width,
                                       n_head=width // 64, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def ours(path: str, *overrides: str):
    """Our Trainer for a config, as rlhf-train builds it (no evaluation, nothing saved)."""
    from conftest import compose

    from rlhf.core.loop.trainer import Trainer

    cfg = compose(f"policy.path={path}", "train.save_final=false", *overrides)
    return Trainer(cfg, Path(tempfile.mkdtemp()))


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")  # our policy.lora defaults


class StepClock:
    """A TRL callback: wall time from the start of each step to the start of the next."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.starts: list[float] = []
                self.lengths: list[float] = []  # mean completion length of each generation

            def on_step_begin(self, args, state, control, **kw):
                self.starts.append(time.perf_counter())

            def on_train_end(self, args, state, control, **kw):
                self.starts.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "completions/mean_length" in logs:
                    self.lengths.append(float(logs["completions/mean_length"]))

            def steps(self) -> list[float]:
                return [b - a for a, b in zip(self.starts, self.starts[1:])]

        return _Clock()


def quiet(trainer):
    """TRL with disable_tqdm prints every log line; the clock keeps what we need."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def trl_args(cls, steps: int, **kw):
    return cls(output_dir=tempfile.mkdtemp(), use_cpu=not torch.cuda.is_available(), bf16=False, report_to=[],
               max_steps=steps, logging_steps=1, save_strategy="no", disable_tqdm=True, **kw)


def prompt_texts(trainer, n: int) -> list[str]:
    """The queries our sampler cuts from the training prompts, as text, so TRL sees the same ones."""
    tok = trainer.policy.tokenizer
    queries = trainer.sampler.sample(trainer.train_prompts[:n], random.Random(0))
    return [tok.decode(q) for q in queries]


def table(title: str, rows: list[tuple], header: tuple) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(c if isinstance(c, str) else f"{c:.3g}" if abs(c) < 100 else f"{c:.0f}" for c in row) + " |")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- DPO


def bench_dpo(path: str, rounds: int, steps: int, batch: int = 8) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlhf.embedded.corpus import preference_pairs

    n_pairs = batch * 4
    mine = ours(path, "optimizer=dpo", f"train.batch_size={batch}", f"data.n_train={n_pairs}")
    pairs = preference_pairs(n_pairs, seed=20_001)  # the embedded training pairs ours reads
    data = Dataset.from_list([{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in pairs])
    for _ in range(n_pairs // batch):  # one pass: every pair's reference log-probs computed and cached
        mine.train_step()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    theirs = {}
    for label, precompute in (("TRL DPOTrainer", False), ("TRL DPOTrainer, precompute_ref_log_probs", True)):
        clock = StepClock()
        args = trl_args(DPOConfig, steps, beta=0.1, learning_rate=2e-4, per_device_train_batch_size=batch,
                        max_length=None, precompute_ref_log_probs=precompute, dataset_num_proc=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, train_dataset=data,
                                 processing_class=AutoTokenizer.from_pretrained(path), peft_config=lora_config(),
                                 callbacks=[clock])
        theirs[label] = (quiet(trainer), clock, [])

    our_times: list[float] = []
    for _ in range(rounds):
        mine.train_step()  # warm-up
        our_times += [timed(mine.train_step) for _ in range(steps)]
        for trainer, clock, times in theirs.values():
            clock.starts.clear()
            trainer.train()
            times += clock.steps()[1:]  # the first step of each train() call is the warm-up
    ours_ms = median_ms(our_times)
    rows = [("rlhf (reference log-probs cached per pair)", ours_ms, 1.0)]
    rows += [(label, median_ms(t), ours_ms / median_ms(t)) for label, (_, _, t) in theirs.items()]
    table(f"DPO step, batch {batch} pairs, LoRA, float32 ({len(our_times)} steps each)", rows,
          ("", "ms / step", "rlhf / this"))


# ---------------------------------------------------------------------------- online RL


def trl_online(kind: str, path: str, prompts: list[str], reward, steps: int, lr: float, **schedule):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    def reward_fn(prompts, completions, **_):
        return reward.score(prompts, completions).tolist()

    tok = AutoTokenizer.from_pretrained(path)
    clock = StepClock()
    args = trl_args(Config, steps, max_completion_length=T, temperature=1.0, top_k=0, top_p=1.0, beta=0.05,
                    learning_rate=lr, **schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=reward_fn, args=args,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tok,
                          peft_config=lora_config(), callbacks=[clock])
    return quiet(trainer), clock


def bench_online(path: str, rounds: int) -> None:
    """Per generated token (EOS included), as responses end at different lengths on each side."""
    # PPO: 32 rollouts, 4 epochs x 4 minibatches of 8 = 16 gradient steps. TRL's matching
    # schedule: one generation of 32 completions, num_iterations=4 passes of 4 steps of 8.
    ppo = ours(path, "optimizer=ppo")
    prompts = prompt_texts(ppo, 512)
    ppo_like = dict(per_device_train_batch_size=8, steps_per_generation=4, num_iterations=4, num_generations=2)
    one_step = dict(per_device_train_batch_size=B * 4, steps_per_generation=1, num_iterations=1, num_generations=4)
    setups = {  # label -> (ours, TRL trainer kind, TRL schedule, TRL steps per our step)
        "PPO vs TRL GRPO, same generation and update work": (ppo, "grpo", ppo_like, 16),
        "PPO vs TRL RLOO, same generation and update work": (ppo, "rloo", ppo_like, 16),
        "GRPO vs TRL GRPO (32 prompts x 4, one step)": (ours(path, "optimizer=grpo"), "grpo", one_step, 1),
        "RLOO vs TRL RLOO (32 prompts x 4, one step)": (ours(path, "optimizer=rloo"), "rloo", one_step, 1),
    }
    rows = []
    for label, (mine, kind, schedule, per_step) in setups.items():
        lr = mine.torch_optimizer.param_groups[0]["lr"]
        trainer, clock = trl_online(kind, path, prompts, mine.reward, per_step * 2, lr, **schedule)
        ours_per_tok, theirs_per_tok = [], []
        for _ in range(rounds):
            mine.train_step()  # warm-up
            for _ in range(2):
                t = time.perf_counter()
                stats = mine.train_step()
                k = mine.optimizer.samples_per_prompt
                ours_per_tok.append((time.perf_counter() - t) / (stats["train/response_len"] * B * k))
            clock.starts.clear(), clock.lengths.clear()
            trainer.train()  # two generations: the first a warm-up
            cycle = sum(clock.steps()[per_step:])
            n_completions = schedule["per_device_train_batch_size"] * schedule["steps_per_generation"]
            theirs_per_tok.append(cycle / (clock.lengths[-1] * n_completions))
        a, b = median_ms(ours_per_tok), median_ms(theirs_per_tok)
        rows.append((label, a, b, a / b))
    table(f"Online RL step per generated token, {B} prompts, response cap {T}, LoRA, float32 ({rounds} rounds)", rows,
          ("", "rlhf ms / token", "TRL ms / token", "rlhf / TRL"))


# ---------------------------------------------------------------------------- the bare-PyTorch limit


def bare_reinforce_step(policy, reward, queries, opt, beta: float, sample: Callable) -> None:
    """REINFORCE with a KL penalty and a batch-mean baseline, as a short script would write it:
    sample, score, reference log-probs with the adapters off, one forward with gradients,
    one backward, one Adam step."""
    from rlhf.core.model.logprobs import position_ids

    tok, model = policy.tokenizer, policy.model
    ids, attn, q = sample(queries)  # (B, Q + T), left-padded queries
    resp = ids[:, q:]
    mask = ((resp == tok.eos_token_id).long().cumsum(1) - (resp == tok.eos_token_id).long() == 0).float()
    attn = torch.cat([attn[:, :q], mask.long()], 1)
    pos = position_ids(attn)
    texts_q = tok.batch_decode([r[m.bool()] for r, m in zip(ids[:, :q], attn[:, :q])], skip_special_tokens=True)
    texts_r = tok.batch_decode([r[m.bool()] for r, m in zip(resp, mask)], skip_special_tokens=True)
    scores = reward.score(texts_q, texts_r)
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, q - 1 : -1].log_softmax(-1)
    logp = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, q - 1 : -1].log_softmax(-1)
    logp = logp.gather(-1, resp[..., None]).squeeze(-1) * mask
    ref = ref.gather(-1, resp[..., None]).squeeze(-1) * mask
    returns = scores - beta * (logp.detach() - ref).sum(1)
    loss = -((returns - returns.mean()) * logp.sum(1)).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def bench_limit(path: str, rounds: int, steps: int) -> None:
    from rlhf.core.loop.optim import adam
    from rlhf.core.rollout import sampling

    mine = ours(path, "optimizer=reinforce", "optimizer.baseline=batch", "optimizer.max_grad_norm=0")
    bare = ours(path, "optimizer=reinforce")  # only for its policy, reward, sampler and prompts
    policy, tok = bare.policy, bare.policy.tokenizer
    opt = adam(list(policy.trainable_parameters()), lr=1e-3)
    rng = random.Random(0)
    gen = bare.sampler.generation_kwargs()

    def hf_generate(queries):
        ids, qmask = sampling.pad_left(queries, tok.pad_token_id, policy.device)
        with torch.no_grad():
            out = policy.model.generate(input_ids=ids, attention_mask=qmask, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id, **gen)
        return out, torch.cat([qmask, torch.ones_like(out[:, ids.shape[1]:])], 1), ids.shape[1]

    def loop_generate(queries):
        g = sampling.generate(policy, queries, gen)
        return g.input_ids, g.attention_mask, g.query_len

    def bare_step(sample):
        queries = bare.sampler.sample(rng.sample(bare.train_prompts, B), rng)
        bare_reinforce_step(policy, bare.reward, queries, opt, 0.05, sample)

    variants = {
        "rlhf, optimizer=reinforce": mine.train_step,
        "bare PyTorch, transformers' generate": lambda: bare_step(hf_generate),
        "bare PyTorch, the core's sampling loop": lambda: bare_step(loop_generate),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for label, fn in variants.items():
            fn()  # warm-up
            times[label] += [timed(fn) for _ in range(steps)]
    ours_ms = median_ms(times["rlhf, optimizer=reinforce"])
    rows = [(label, median_ms(t), ours_ms / median_ms(t)) for label, t in times.items()]
    table(f"REINFORCE step against bare PyTorch, {B} prompts, response cap {T}, LoRA, float32", rows,
          ("", "ms / step", "rlhf / this"))


# ---------------------------------------------------------------------------- memory and scaling


def bench_memory(repeats: int) -> None:
    import subprocess

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--repeats", str(repeats)],
                         capture_output=True, text=True, check=True)
    print("\n## Memory\n")
    print(out.stdout.strip())


def bench_scaling(path: str, rounds: int) -> None:
    """Responses run to the cap here: a random-init policy almost never says EOS."""
    rows = []
    for batch, cap in [(8, 24), (16, 24), (32, 24), (64, 24), (32, 8), (32, 16), (32, 48), (32, 96)]:
        mine = ours(path, "optimizer=ppo", f"train.batch_size={batch}", f"sampler.max_new_tokens={cap}")
        mine.train_step()
        times, tokens = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            stats = mine.train_step()
            times.append(time.perf_counter() - t)
            tokens.append(stats["train/response_len"] * batch)
        ms = median_ms(times)
        rows.append((str(batch), str(cap), statistics.median(tokens) / batch, ms, ms / statistics.median(tokens)))
    table("PPO step against batch size and response length (random-init policy)", rows,
          ("batch", "cap", "mean length", "ms / step", "ms / token"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default="dpo,online,limit,memory,scaling")
    p.add_argument("--model", default="embedded", choices=["embedded", "tiny", "small", "medium"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round (dpo, limit)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    import trl

    from rlhf.contracts import registry

    registry.discover()
    sections = args.sections.split(",")
    out = Path(tempfile.mkdtemp())
    path = model_path(args.model, out)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"# rlhf benchmarks: model {args.model}, {device}, torch {torch.__version__}, TRL {trl.__version__}")
    if "dpo" in sections:
        bench_dpo(path, args.rounds, args.steps)
    if "online" in sections:
        bench_online(path, args.rounds)
    if "limit" in sections:
        bench_limit(path, args.rounds, args.steps)
    if "memory" in sections:
        bench_memory(args.rounds)
    if "scaling" in sections:
        bench_scaling(model_path("tiny", out) if args.model == "embedded" else path, args.rounds)


if __name__ == "__main__":
    main()
