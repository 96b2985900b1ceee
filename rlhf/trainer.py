"""The one training loop every optimizer shares.

prompts --sampler--> queries --policy.generate--> responses --reward.score--> scores
--optimizer.update--> metrics --> metrics.jsonl and the logger plugins.

Offline optimizers take preference pairs instead of rollouts; the loop, evaluation and
logging are the same for all.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf import numerics, registry, rollout
from rlhf.config import validate
from rlhf.data import Shuffled, load_prompts
from rlhf.evaluation import evaluate, save_samples
from rlhf.interfaces import Logger, PolicyOptimizer, QuerySampler, RewardSource, RunInfo
from rlhf.policy import Policy
from rlhf.preferences import OfflinePairs, OnlinePairs, bradley_terry_pairs, load_pairs

MAX_PROMPT_TOKENS = 64  # prompts are cut to this before the sampler cuts a query out of them
CONSUMES = ("rollouts", "preference_pairs", "sampled_pairs")


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


def judge(name: str) -> RewardSource:
    """A reward plugin by name with its default settings, as an evaluation judge."""
    info = next((p for p in registry.plugins("reward") if p.name == name), None)
    if info is None:
        names = ", ".join(p.name for p in registry.plugins("reward"))
        raise ValueError(f"eval.judges: no reward plugin named {name!r} (registered: {names})")
    return info.cls(info.cls.Config())


class Trainer:
    """Builds a run from its config, then `fit()` trains, evaluates and logs it."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run: RunInfo | None = None):
        from transformers import set_seed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file "Loading weights" bars drown the run's own
        self.t0 = time.time()
        validate(cfg)
        self.cfg, self.run_dir = cfg, run_dir
        self.run = run or RunInfo(run_dir=str(run_dir), name=run_dir.name, group_dir=str(run_dir))
        # plugins first: they are cheap, so their config errors come before any model loads
        self.optimizer: PolicyOptimizer = registry.instantiate("optimizer", cfg.optimizer)
        self.reward: RewardSource = registry.instantiate("reward", cfg.reward)
        self.sampler: QuerySampler = registry.instantiate("sampler", cfg.sampler)
        self.loggers: list[Logger] = [registry.instantiate("logger", n) for n in (cfg.logger or {}).values()]
        self.judges = {name: judge(name) for name in cfg.eval.judges}
        if self.optimizer.consumes not in CONSUMES:
            raise ValueError(f"optimizer consumes {self.optimizer.consumes!r}; the core provides {CONSUMES}")
        if cfg.eval.kl_to_optimum and self.sampler.generation_kwargs().get("max_new_tokens") != 1:
            raise ValueError("eval.kl_to_optimum is exact for one-token responses only: set sampler.max_new_tokens=1")
        if self.optimizer.consumes != "preference_pairs":
            for message in self.sampler.kl_bias_warnings():
                warnings.warn(message, stacklevel=1)

        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        set_seed(cfg.seed)
        self.policy = Policy.load(OmegaConf.to_object(cfg.policy), pick_device(cfg.device))
        if self.optimizer.needs_value_head:
            self.policy.attach_value_head()
        self.optimizer.setup(self.policy, self.sampler.temperature)
        self.scheduler = None
        if cfg.train.lr_schedule == "linear":  # plugins keep their torch optimizer as `opt`
            steps = cfg.train.steps
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer.opt, lambda i: max(0.0, 1 - i / steps))

        train_texts, eval_texts = load_prompts(cfg.data)
        self.train_prompts, eval_prompts = self._tokenize(train_texts), self._tokenize(eval_texts)
        self.eval_queries = self.sampler.sample(eval_prompts, random.Random(cfg.eval.seed))
        self.next_batch = self._batch_source()

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.policy.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]

    def _batch_source(self) -> Callable[[int], Any]:
        """The core service that feeds this optimizer: rollouts, data pairs or sampled pairs."""
        cfg, kind = self.cfg, self.optimizer.consumes
        if kind == "preference_pairs" and cfg.data.pairs == "bradley_terry":
            return bradley_terry_pairs(self.policy, self.reward, self.train_prompts, cfg.data.n_train, cfg.seed).next
        if kind == "preference_pairs":
            pairs, _ = load_pairs(cfg.data)
            return OfflinePairs.from_text(self.policy, pairs, MAX_PROMPT_TOKENS, cfg.seed).next
        if kind == "sampled_pairs":
            return OnlinePairs(self.policy, self.reward, self.train_prompts, self.sampler, cfg.seed).next
        rng, order = random.Random(cfg.seed), Shuffled(len(self.train_prompts), random.Random(cfg.seed + 1))
        k = getattr(self.optimizer, "samples_per_prompt", 1)  # RLOO and GRPO compare k samples of a prompt

        def rollouts(batch_size: int):
            queries = self.sampler.sample([self.train_prompts[i] for i in order.take(batch_size)], rng)
            queries = [q for q in queries for _ in range(k)]  # each prompt's k samples side by side
            return rollout.collect(self.policy, self.reward, queries, self.sampler.generation_kwargs(), self.sampler.temperature)

        return rollouts

    def train_step(self) -> dict[str, float]:
        batch = self.next_batch(self.cfg.train.batch_size)
        stats = dict(self.optimizer.update(batch))
        if self.scheduler is not None:
            self.scheduler.step()
        if self.optimizer.consumes == "rollouts":
            seq_kl = numerics.kl_per_token(batch.logprobs, batch.ref_logprobs, "k1").sum(1)
            stats = {
                "train/reward": batch.scores.mean().item(),
                "train/kl": seq_kl.mean().item(),
                "train/response_len": batch.mask.sum(1).mean().item(),
                **stats,
            }
        elif batch.scores is not None:  # online pairs: what the reward source thought of them
            stats = {"train/reward": batch.scores.mean().item(), **stats}
        return stats

    def evaluate(self, step: int) -> dict[str, float]:
        metrics, rows = evaluate(
            self.policy, self.reward, self.eval_queries, self.sampler.generation_kwargs(),
            self.sampler.temperature, self.cfg.eval.seed, self.cfg.train.batch_size, self.judges,
        )
        save_samples(self.run_dir, step, rows, self.cfg.eval.samples)
        if self.cfg.eval.kl_to_optimum:
            from rlhf.optimum import kl_to_optimum

            metrics["eval/kl_to_optimum"] = kl_to_optimum(
                self.policy, self.reward, self.eval_queries, self.cfg.optimizer.beta, self.sampler.temperature
            )
        return metrics

    def fit(self) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        recorder = RunRecorder(self.run_dir)
        config = OmegaConf.to_container(cfg, resolve=True)
        for lg in self.loggers:
            lg.start(self.run, config)

        def emit(metrics: dict[str, float], step: int) -> None:
            recorder.log(metrics, step)
            for lg in self.loggers:
                lg.log(metrics, step)

        first = last = self.evaluate(0)
        emit(first, 0)
        bar = tqdm(range(1, cfg.train.steps + 1), desc="rlhf-train", mininterval=1, dynamic_ncols=True)
        for step in bar:
            metrics = self.train_step()
            emit(metrics, step)
            bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3f}" for k in ("train/reward", "train/kl", "loss/dpo") if k in metrics}, refresh=False)
            if step % cfg.eval.every == 0 or step == cfg.train.steps:
                last = self.evaluate(step)
                emit(last, step)
        bar.close()

        if cfg.train.save_final:
            self.policy.save(str(self.run_dir / "final"))
        judges = {f"judge_{name}_{when}": m[f"eval/judge/{name}"] for name in self.judges for when, m in (("start", first), ("end", last))}
        summary = {
            "reward_start": first["eval/reward"],
            "reward_end": last["eval/reward"],
            "kl_start": first["eval/kl"],
            "kl_end": last["eval/kl"],
            "response_len_end": last["eval/response_len"],
            "distinct_2_end": last["eval/distinct_2"],
            **judges,
            **({"kl_to_optimum": last["eval/kl_to_optimum"]} if cfg.eval.kl_to_optimum else {}),
            "steps": cfg.train.steps,
            "torch_threads": torch.get_num_threads(),
            "wall_s": round(time.time() - self.t0, 2),
            "run_dir": str(self.run_dir),
        }
        recorder.summary(summary)
        for lg in self.loggers:
            lg.finish(summary)
        return summary


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    return Trainer(cfg, run_dir).fit()
