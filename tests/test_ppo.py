"""PPO's losses against hand-derived numbers, and its options on real rollouts."""

import math

import torch
from rlhf_plugins.optimizers.ppo import ppo_losses
from test_policy import _load, ppo_steps
from torch.testing import assert_close


def test_clipped_surrogate_and_value_loss_by_hand():
    # two tokens of one sequence and a padded third; clip 0.2 for both losses
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[math.log(1.5), math.log(0.5), 7.0]])  # ratios 1.5, 0.5 (pad ignored)
    adv = torch.tensor([[1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    old_v = torch.tensor([[0.0, 1.0, 0.0]])
    vpred = torch.tensor([[0.5, 1.1, 3.0]])
    ret = torch.tensor([[1.0, 0.0, 0.0]])
    pg, vf, ratio, _, vf_clipped = ppo_losses(new, old, adv, vpred, old_v, ret, mask, 0.2, 0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped);  token 2: max(-0.5, -0.8) = -0.5
    assert_close(pg, torch.tensor((-1.2 - 0.5) / 2))
    # token 1: vpred 0.5 clipped to 0.2: max((0.5-1)^2, (0.2-1)^2) = 0.64
    # token 2: vpred 1.1 within the clip: max(1.21, 1.21) = 1.21;  vf = 0.5 * mean
    assert_close(vf, torch.tensor(0.5 * (0.64 + 1.21) / 2))
    assert_close(ratio[0, :2], torch.tensor([1.5, 0.5]))
    assert vf_clipped[0, :2].tolist() == [True, False]


def test_adaptive_kl_and_k3_estimator(embedded_dir):
    torch.manual_seed(0)
    _, history = ppo_steps(_load(True), overrides=("optimizer.adaptive_kl=true", "optimizer.kl_estimator=k3",
                                                   "optimizer.kl_horizon=100", "optimizer.lr=3e-3"))
    betas = [h["objective/beta"] for h in history]
    assert betas[0] == 0.05 and betas[-1] != betas[0]  # the controller moved beta
    assert all(math.isfinite(v) for h in history for v in h.values())


def test_reward_model_stays_frozen(embedded_dir):
    torch.manual_seed(0)
    reward, _ = ppo_steps(_load(True), steps=2)
    model = reward.pipeline().model
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_minibatch_drops_shared_padding_and_changes_no_loss(embedded_dir):
    """A minibatch of rows keeps only the columns some of them use; the PPO losses on it equal
    those computed on the untrimmed rows."""
    import random

    from conftest import compose

    from rlhf.contracts import registry
    from rlhf.core.rollout import collect
    from rlhf.core.toolkit import numerics

    policy = _load(True)
    policy.attach_value_head()
    with torch.no_grad():
        policy.value_head.weight.normal_()
    cfg = compose("sampler.max_new_tokens=16")
    sampler = registry.instantiate("sampler", cfg.sampler)
    tok = policy.tokenizer
    texts = ["The", "What a dull and", "I loved it", "Honestly, the plot was", "A", "This film"]
    queries = [tok(t, add_special_tokens=False).input_ids for t in texts]
    torch.manual_seed(0)
    r = collect.collect(policy, registry.instantiate("reward", cfg.reward), queries, sampler.generation_kwargs(), 1.0)
    adv = torch.randn(r.mask.shape) * r.mask
    idx = torch.tensor(sorted(random.Random(0).sample(range(len(texts)), 3)))
    mb, t = collect.minibatch(r, idx, advantages=adv)
    assert mb.input_ids.shape[1] < r.input_ids.shape[1] and mb.mask.sum() == r.mask[idx].sum()
    assert (mb.attention_mask[:, : mb.query_len].sum(0) > 0).all()  # no query column all padding
    assert (mb.mask.sum(0) > 0).all()  # no response column all padding

    def losses(ids, attn, q, mask, old, a, values):
        logits, v = policy.forward(ids, attn, q)
        new = numerics.logprobs_of(logits, ids[:, q:])
        return ppo_losses(new, old, a, v, values, a, mask, 0.2, 0.2)[:2]

    full = losses(r.input_ids[idx], r.attention_mask[idx], r.query_len, r.mask[idx], r.logprobs[idx], adv[idx], r.values[idx])
    trimmed = losses(mb.input_ids, mb.attention_mask, mb.query_len, mb.mask, mb.logprobs, t["advantages"], mb.values)
    for a, b in zip(full, trimmed):
        assert_close(a, b, atol=1e-6, rtol=1e-6)
