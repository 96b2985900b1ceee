"""`rlhf-train-rm`: a reward model trained with the Bradley-Terry loss on preference pairs.

P(chosen > rejected) = sigma(r(x, y_c) - r(x, y_r)), so the loss is
-log sigma(r_c - r_r). The model is an AutoModelForSequenceClassification with one label,
by default started from the embedded SFT policy (as in Ouyang et al. 2022, where the RM
starts from the SFT model). The run directory gets `reward_model/` (safetensors,
tokenizer, and optionally `normalization.json`: mean and std of its scores on samples of
the reference policy, so the reward is mean 0, std 1 there) and `summary.json` with
`pairwise_accuracy` on held-out pairs. Shares `conf/` with rlhf-train.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rlhf.apps import hydra_setup
from rlhf.contracts import registry
from rlhf.contracts.checks import require
from rlhf.contracts.metrics import EVAL_PAIRWISE_ACCURACY, TRAIN_ACCURACY
from rlhf.contracts.schema import LoraSettings, PolicyConfig, RMSettings
from rlhf.core.loop.optim import gradient_step
from rlhf.core.model.policy import Policy
from rlhf.core.model.reward_model import load_reward_model, pairwise_accuracy, rm_scores, text_of
from rlhf.core.parallel.distributed import pick_device
from rlhf.core.rollout import collect, sampling
from rlhf.core.rollout.data import Shuffled, load_prompts, sample_queries, tokenize_prompts
from rlhf.core.rollout.pairs import load_pairs
from rlhf.core.run import checkpoint, rundir
from rlhf.core.run.rundir import RunRecorder


@dataclass
class Setup:
    """What training a reward model needs, checked and loaded before the run directory is written."""

    settings: RMSettings
    sampler: Any
    device: torch.device
    train_pairs: list
    held_out: list
    model: torch.nn.Module
    tokenizer: Any


def setup(cfg: DictConfig) -> Setup:
    """The settings checked, the pairs read, the base model loaded: every refusal comes from here."""
    s: RMSettings = OmegaConf.to_object(cfg.rm)
    require("rm", [(f"rm.{key}", getattr(s, key), getattr(s, key) >= 1, "at least 1")
                   for key in ("steps", "batch_size", "eval_every", "normalize_samples")]
            + [("rm.lr", s.lr, s.lr > 0, "> 0")])
    sampler = registry.instantiate("sampler", cfg.sampler)  # cheap, and checks its settings early
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    checkpoint.seed_all(cfg.seed)
    device = pick_device(cfg.device)
    train_pairs, held_out = load_pairs(cfg.data)
    base = s.base
    if base == "embedded":
        from rlhf.embedded.build import policy_path

        base = policy_path()
    model, tokenizer = load_reward_model(base, device, s.trust_remote_code, num_labels=1)
    return Setup(s, sampler, device, train_pairs, held_out, model, tokenizer)


def train_reward_model(cfg: DictConfig, run_dir: Path, ready: Setup | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    t0 = time.time()
    ready = ready or setup(cfg)
    s, sampler, device, model, tokenizer = ready.settings, ready.sampler, ready.device, ready.model, ready.tokenizer
    train_pairs, held_out = ready.train_pairs, ready.held_out
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    order = Shuffled(len(train_pairs), random.Random(cfg.seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = RunRecorder(run_dir)
    log = recorder.log

    accuracy = pairwise_accuracy(model, tokenizer, held_out)
    log({EVAL_PAIRWISE_ACCURACY: accuracy}, 0)
    bar = tqdm(range(1, s.steps + 1), desc="rlhf-train-rm", mininterval=1, dynamic_ncols=True)
    for step in bar:
        model.train()
        batch = [train_pairs[i] for i in order.take(s.batch_size)]
        r_chosen = rm_scores(model, tokenizer, [text_of(p.prompt, p.chosen, tokenizer) for p in batch], s.batch_size)
        r_rejected = rm_scores(model, tokenizer, [text_of(p.prompt, p.rejected, tokenizer) for p in batch], s.batch_size)
        loss = -F.logsigmoid(r_chosen - r_rejected).mean()  # Bradley-Terry
        gradient_step(opt, list(model.parameters()), loss, 1.0)
        log({"loss/bt": loss.item(), TRAIN_ACCURACY: (r_chosen > r_rejected).float().mean().item()}, step)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % s.eval_every == 0 or step == s.steps:
            accuracy = pairwise_accuracy(model, tokenizer, held_out)
            log({EVAL_PAIRWISE_ACCURACY: accuracy}, step)
    bar.close()

    out = run_dir / rundir.REWARD_MODEL
    model.eval()
    summary: dict[str, Any] = {"pairwise_accuracy": accuracy, "steps": s.steps, "held_out_pairs": len(held_out)}
    with rundir.atomic_dir(out) as partial:  # the whole reward model, or none
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        if s.normalize:
            summary.update(_normalization(cfg, model, tokenizer, sampler, device, partial, s.normalize_samples))
    summary.update(wall_s=round(time.time() - t0, 2), reward_model=str(out))
    recorder.summary(summary)
    return summary


@torch.no_grad()
def _normalization(cfg, model, tokenizer, sampler, device, out: Path, n: int) -> dict[str, float]:
    """Mean and std of the RM's scores on samples of the reference policy."""
    policy_cfg: PolicyConfig = OmegaConf.to_object(cfg.policy)
    policy_cfg.lora = LoraSettings(enabled=True)  # adapters at init: exactly the reference
    policy = Policy.load(policy_cfg, device)
    prompts, _ = load_prompts(cfg.data)
    ids = tokenize_prompts(policy.tokenizer, prompts[:n])
    queries = sample_queries(sampler, ids, random.Random(cfg.seed))
    texts = []
    for i in range(0, len(queries), 64):
        g = sampling.generate(policy, queries[i : i + 64], sampler.generation_kwargs())
        texts += [text_of(a, b) for a, b in zip(*collect.decode(policy, g.input_ids, g.attention_mask, g.query_len))]
    scores = rm_scores(model, tokenizer, texts)
    stats = {"mean": scores.mean().item(), "std": scores.std().item(), "samples": len(texts)}
    (out / rundir.NORMALIZATION).write_text(rundir.to_json(stats, indent=2) + "\n")
    return {"reference_mean": stats["mean"], "reference_std": stats["std"]}


@hydra.main(config_path="pkg://rlhf.conf", config_name="train_rm", version_base="1.3")
def _train_rm(cfg: DictConfig) -> float:

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    single = hc.mode == RunMode.RUN
    owner = None
    try:
        with hydra_setup.refusing(rundir.RunDirRefused) if single else contextlib.nullcontext():
            owner = rundir.claim(run_dir, continuing=False)  # before a model loads and logs into the directory
            ready = setup(cfg)  # a setting, a pair file or a model that cannot be used: one line, nothing written
    except SystemExit:
        if owner is not None:  # the directory was this run's alone: its log holds only the refused setup
            owner.release()
            (run_dir / f"{hc.job.name}.log").unlink(missing_ok=True)
        rundir.discard_if_empty(run_dir)
        raise
    try:
        rundir.write_record(run_dir, cfg, HydraConfig.instance().cfg, hc.overrides.task)
        s = train_reward_model(cfg, run_dir, ready)
    finally:
        owner.release()
    print(f"held-out pairwise accuracy   {s['pairwise_accuracy']:.3f}  ({s['held_out_pairs']} pairs)")
    print(f"reward model                 {s['reward_model']}")
    print(f"use it with                  rlhf-train reward=learned_rm reward.path={run_dir}")
    return s["pairwise_accuracy"]


def main() -> None:
    hydra_setup.prepare()
    _train_rm()


if __name__ == "__main__":
    main()
