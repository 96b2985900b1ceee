"""`rlhf-train-rm`: a reward model trained with the Bradley-Terry loss on preference pairs.

P(chosen > rejected) = sigma(r(x, y_c) - r(x, y_r)), so the loss is
-log sigma(r_c - r_r). The model is an AutoModelForSequenceClassification with one label,
by default started from the embedded SFT policy (as in Ouyang et al. 2022, where the RM
starts from the SFT model). The run directory gets `reward_model/` (safetensors,
tokenizer, and optionally `normalization.json`: mean and std of its scores on samples of
the reference policy, so the reward is mean 0, std 1 there) and `summary.json` with
`pairwise_accuracy` on held-out pairs.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from rlhf.config import DataConfig
from rlhf.data import Shuffled
from rlhf.policy import PolicyConfig

NORMALIZATION_FILE = "normalization.json"
MAX_TOKENS = 128


@dataclass
class RMSettings:
    base: str = "embedded"  # model to start from: "embedded" (the SFT policy), a hub name or a local dir
    steps: int = 100  # optimizer steps
    batch_size: int = 32  # pairs per step
    lr: float = 1e-3  # AdamW learning rate (the whole model is trained)
    eval_every: int = 50  # held-out pairwise accuracy every N steps (and at the end)
    normalize: bool = True  # store mean/std of scores on reference samples; reward=learned_rm applies them
    normalize_samples: int = 256  # reference samples for those statistics
    trust_remote_code: bool = False  # run model code shipped with a hub repo


@dataclass
class RMRunConfig:
    seed: int = 0  # seeds python and torch
    device: str = "auto"  # auto (cuda if present), cpu, cuda, ...
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampler: Any = MISSING
    rm: RMSettings = field(default_factory=RMSettings)


def store_schema() -> None:
    ConfigStore.instance().store(name="rlhf_rm_schema", node=RMRunConfig)


def text_of(prompt: str, response: str) -> str:
    """How a (prompt, response) is shown to the reward model, in training and in scoring."""
    return f"{prompt} {response}"


def load_reward_model(path: str, device: torch.device | str, trust_remote_code: bool = False, **kwargs):
    """(model, tokenizer), right padding; `num_labels=1` starts a new one-logit head on a base."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.pad_token_id is None:  # GPT-2 style: pad with EOS; the head reads the last real token
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return model.to(device), tokenizer


def rm_scores(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        out.append(model(**enc.to(device)).logits[:, 0].float())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, pairs) -> float:
    model.eval()
    chosen = rm_scores(model, tokenizer, [text_of(p.prompt, p.chosen) for p in pairs])
    rejected = rm_scores(model, tokenizer, [text_of(p.prompt, p.rejected) for p in pairs])
    return (chosen > rejected).float().mean().item()


def train_reward_model(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    from tqdm import tqdm
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    from rlhf import registry
    from rlhf.preferences import load_pairs
    from rlhf.optim import gradient_step
    from rlhf.distributed import pick_device
    from rlhf.trainer import RunRecorder

    hf_logging.disable_progress_bar()
    t0 = time.time()
    s: RMSettings = OmegaConf.to_object(cfg.rm)
    if s.steps < 1 or s.batch_size < 1 or s.lr <= 0 or s.eval_every < 1:
        raise ValueError(f"rm: steps, batch_size and eval_every must be >= 1 and lr > 0, got {s}")
    sampler = registry.instantiate("sampler", cfg.sampler)  # cheap, and checks its settings early
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = pick_device(cfg.device)
    train_pairs, held_out = load_pairs(cfg.data)

    base = s.base
    if base == "embedded":
        from rlhf.embedded.build import policy_path

        base = policy_path()
    model, tokenizer = load_reward_model(base, device, s.trust_remote_code, num_labels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    order = Shuffled(len(train_pairs), random.Random(cfg.seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = RunRecorder(run_dir)
    log = recorder.log

    accuracy = pairwise_accuracy(model, tokenizer, held_out)
    log({"eval/pairwise_accuracy": accuracy}, 0)
    bar = tqdm(range(1, s.steps + 1), desc="rlhf-train-rm", mininterval=1, dynamic_ncols=True)
    for step in bar:
        model.train()
        batch = [train_pairs[i] for i in order.take(s.batch_size)]
        r_chosen = rm_scores(model, tokenizer, [text_of(p.prompt, p.chosen) for p in batch], s.batch_size)
        r_rejected = rm_scores(model, tokenizer, [text_of(p.prompt, p.rejected) for p in batch], s.batch_size)
        loss = -F.logsigmoid(r_chosen - r_rejected).mean()  # Bradley-Terry
        gradient_step(opt, list(model.parameters()), loss, 1.0)
        log({"loss/bt": loss.item(), "train/accuracy": (r_chosen > r_rejected).float().mean().item()}, step)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % s.eval_every == 0 or step == s.steps:
            accuracy = pairwise_accuracy(model, tokenizer, held_out)
            log({"eval/pairwise_accuracy": accuracy}, step)
    bar.close()

    out = run_dir / "reward_model"
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    summary: dict[str, Any] = {"pairwise_accuracy": accuracy, "steps": s.steps, "held_out_pairs": len(held_out)}
    if s.normalize:
        summary.update(_normalization(cfg, model, tokenizer, sampler, device, out, s.normalize_samples))
    summary.update(wall_s=round(time.time() - t0, 2), reward_model=str(out))
    recorder.summary(summary)
    return summary


@torch.no_grad()
def _normalization(cfg, model, tokenizer, sampler, device, out: Path, n: int) -> dict[str, float]:
    """Mean and std of the RM's scores on samples of the reference policy."""
    from rlhf import rollout
    from rlhf.data import load_prompts
    from rlhf.policy import LoraSettings, Policy

    policy_cfg: PolicyConfig = OmegaConf.to_object(cfg.policy)
    policy_cfg.lora = LoraSettings(enabled=True)  # adapters at init: exactly the reference
    policy = Policy.load(policy_cfg, device)
    prompts, _ = load_prompts(cfg.data)
    ids = policy.tokenizer(prompts[:n], add_special_tokens=False, truncation=True, max_length=64)["input_ids"]
    queries = sampler.sample(ids, random.Random(cfg.seed))
    texts = []
    for i in range(0, len(queries), 64):
        g = rollout.generate(policy, queries[i : i + 64], sampler.generation_kwargs())
        texts += [text_of(a, b) for a, b in zip(*rollout.decode(policy, g.input_ids, g.attention_mask, g.query_len))]
    scores = rm_scores(model, tokenizer, texts)
    stats = {"mean": scores.mean().item(), "std": scores.std().item(), "samples": len(texts)}
    (out / NORMALIZATION_FILE).write_text(json.dumps(stats, indent=2) + "\n")
    return {"reference_mean": stats["mean"], "reference_std": stats["std"]}
