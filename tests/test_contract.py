"""Every registered optimizer x every reward source, through the core's Trainer.

A few steps run; losses and metrics are finite; every trainable parameter changes; the
base weights (the reference) and the reward source's weights do not.
"""

import math

import pytest
import torch
from conftest import compose

from rlhf.contracts import registry
from rlhf.core.loop.trainer import Trainer
from rlhf.core.rollout import collect

registry.discover()
OPTIMIZERS = [[f"optimizer={p.name}"] for p in registry.plugins("optimizer")] + [["optimizer=dpo", "optimizer.online=true"]]
REWARDS = [p.name for p in registry.plugins("reward")]


def _reward_overrides(name, optimizer, reward_model_dir):
    if name == "learned_rm":
        return [f"reward.path={reward_model_dir}"]
    offline = optimizer in (["optimizer=dpo"], ["optimizer=sft"])  # fixed pairs: toy problems label them (Bradley-Terry)
    toy = [*(["data.pairs=bradley_terry"] if offline else []),
           *(["eval.kl_to_optimum=false"] if optimizer == ["optimizer=sft"] else [])]  # (no beta: no pi* to be near)
    if name == "table":  # the reward table belongs to the toy problem's prompts and tokens
        return ["+experiment=toy_bandit", "sampler.max_new_tokens=1", *toy]
    if name == "sequence":  # so does the sequence reward: the sequence toy's prompts, its cap of 3 tokens
        return ["+experiment=toy_sequences", "sampler.max_new_tokens=3", *toy]
    if name == "verifiable":  # answers to check: the arithmetic task's prompts carry them
        return ["+experiment=arithmetic"]
    if name == "weighted":
        return ["+reward.weights.lexicon=1.0", "+reward.weights.sentiment=0.5"]
    return []


def _reward_weights(reward):
    model = getattr(reward, "model", None) or getattr(getattr(reward, "_pipe", None), "model", None)
    return {n: p.clone() for n, p in model.named_parameters()} if model is not None else {}


# every optimizer with one reward source (the default's), and every reward source with one
# optimizer of each kind of batch (REINFORCE's rollouts, offline DPO's pairs): what a plugin owes
# the contract is checked for each plugin, not for each product of two of them
PAIRS = ([(o, "sentiment") for o in OPTIMIZERS]
         + [(o, r) for o in (["optimizer=reinforce"], ["optimizer=dpo"]) for r in REWARDS if r != "sentiment"])


@pytest.mark.parametrize(("optimizer", "reward_name"), PAIRS, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_contract(optimizer, reward_name, tmp_path, reward_model_dir):
    cfg = compose(*optimizer, f"reward={reward_name}", "train.batch_size=4", "sampler.max_new_tokens=8",
                  "data.n_train=16", "data.n_eval=4", "seed=3", *_reward_overrides(reward_name, optimizer, reward_model_dir))
    torch.manual_seed(0)
    t = Trainer(cfg, tmp_path)
    model = t.policy.model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in t.policy.model.named_parameters() if p.requires_grad}
    head = [p.detach().clone() for p in t.policy.value_head.parameters()] if t.policy.value_head is not None else []

    collect.score(t.reward, [t.policy.tokenizer.decode(t.eval_queries[0])], ["fine ."], t.policy.device,
                  collect.columns_of(t.eval_queries[:1]))  # reward models load on first use
    reward_before = _reward_weights(t.reward)
    metrics = [t.train_step() for _ in range(4)]
    assert all(math.isfinite(v) for m in metrics for v in m.values()), metrics
    assert any(k.startswith("loss/") for k in metrics[0])
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base parameter {n} changed"
        else:
            assert not torch.equal(p, trainable[n]), f"trainable parameter {n} did not change"
    for before, p in zip(head, t.policy.value_head.parameters() if head else []):
        assert not torch.equal(before, p)
    for n, p in _reward_weights(t.reward).items():
        assert torch.equal(p, reward_before[n]) and not p.requires_grad, f"reward weight {n} changed"
