"""PPO's losses against hand-derived numbers, and its options on real rollouts."""

import math

import torch
from test_policy import _load, ppo_steps
from torch.testing import assert_close

from rlhf_plugins.optimizers.ppo import ppo_losses


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
    model = reward._pipeline().model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
