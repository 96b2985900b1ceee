"""The one training loop every optimizer shares.

prompts --sampler--> queries --policy.generate--> responses --reward.score--> scores
--optimizer.update--> metrics --> metrics.jsonl and the logger plugins.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf import numerics, registry, rollout
from rlhf.config import validate
from rlhf.data import load_prompts
from rlhf.evaluation import evaluate, save_samples
from rlhf.interfaces import Logger, PolicyOptimizer, QuerySampler, RewardSource
from rlhf.policy import Policy

MAX_PROMPT_TOKENS = 64  # prompts are cut to this before the sampler cuts a query out of them


class RunRecorder:
    """Writes `metrics.jsonl` (one object per logged step) and `summary.json`, always."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._file = open(run_dir / "metrics.jsonl", "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._file.close()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_components(cfg: DictConfig) -> tuple[PolicyOptimizer, RewardSource, QuerySampler, list[Logger]]:
    """Instantiate the plugins (cheap: none loads a model here)."""
    optimizer = registry.instantiate("optimizer", cfg.optimizer)
    reward = registry.instantiate("reward", cfg.reward)
    sampler = registry.instantiate("sampler", cfg.sampler)
    loggers = [registry.instantiate("logger", node) for node in (cfg.logger or {}).values()]
    return optimizer, reward, sampler, loggers


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the run's own

    t0 = time.time()
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer, reward, sampler, loggers = build_components(cfg)
    for message in sampler.kl_bias_warnings():
        warnings.warn(message, stacklevel=1)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)

    policy = Policy.load(OmegaConf.to_object(cfg.policy), device)
    if optimizer.needs_value_head:
        policy.attach_value_head()
    optimizer.setup(policy, sampler.temperature)

    train_texts, eval_texts = load_prompts(cfg.data)
    tokenize = lambda texts: policy.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]  # noqa: E731
    train_prompts, eval_prompts = tokenize(train_texts), tokenize(eval_texts)
    eval_queries = sampler.sample(eval_prompts, random.Random(cfg.eval.seed))
    rng = random.Random(cfg.seed)
    gen_kwargs, temperature = sampler.generation_kwargs(), sampler.temperature

    recorder = RunRecorder(run_dir)
    flat_config = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.start(str(run_dir), flat_config)

    def run_eval(step: int) -> dict[str, float]:
        metrics, rows = evaluate(policy, reward, eval_queries, gen_kwargs, temperature, cfg.eval.seed, cfg.train.batch_size)
        save_samples(run_dir, step, rows, cfg.eval.samples)
        emit(metrics, step)
        return metrics

    def emit(metrics: dict[str, float], step: int) -> None:
        recorder.log(metrics, step)
        for lg in loggers:
            lg.log(metrics, step)

    first = last = run_eval(0)
    order: list[int] = []
    bar = tqdm(range(1, cfg.train.steps + 1), desc="rlhf-train", mininterval=1, dynamic_ncols=True)
    for step in bar:
        if len(order) < cfg.train.batch_size:  # reshuffle once per pass over the prompts
            order += rng.sample(range(len(train_prompts)), len(train_prompts))
        batch_ids, order = order[: cfg.train.batch_size], order[cfg.train.batch_size :]
        queries = sampler.sample([train_prompts[i] for i in batch_ids], rng)
        batch = rollout.collect(policy, reward, queries, gen_kwargs, temperature)
        stats = dict(optimizer.update(batch))
        seq_kl = numerics.kl_per_token(batch.logprobs, batch.ref_logprobs, "k1").sum(1)
        metrics = {
            "train/reward": batch.scores.mean().item(),
            "train/kl": seq_kl.mean().item(),
            "train/response_len": batch.mask.sum(1).mean().item(),
            **stats,
        }
        emit(metrics, step)
        bar.set_postfix(reward=f"{metrics['train/reward']:.3f}", kl=f"{metrics['train/kl']:.2f}", refresh=False)
        if step % cfg.eval.every == 0 or step == cfg.train.steps:
            last = run_eval(step)
    bar.close()

    if cfg.train.save_final:
        policy.save(str(run_dir / "final"))
    summary = {
        "reward_start": first["eval/reward"],
        "reward_end": last["eval/reward"],
        "kl_start": first["eval/kl"],
        "kl_end": last["eval/kl"],
        "response_len_end": last["eval/response_len"],
        "distinct_2_end": last["eval/distinct_2"],
        "steps": cfg.train.steps,
        "wall_s": round(time.time() - t0, 2),
        "run_dir": str(run_dir),
    }
    recorder.summary(summary)
    for lg in loggers:
        lg.finish(summary)
    if not math.isfinite(summary["kl_end"]):
        warnings.warn(f"final KL to the reference is {summary['kl_end']}", stacklevel=1)
    return summary
