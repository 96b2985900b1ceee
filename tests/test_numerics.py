"""The shared numerics against numbers derived by hand."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.core.rollout.sampling import pad_left, response_mask
from rlhf.core.toolkit import numerics


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert_close(numerics.masked_mean(x, m), torch.tensor(2.0))  # the 100 is padding
    # unbiased variance of (1, 2, 3) is 1, so whitening gives (-1, 0, 1) and 0 on padding
    assert_close(numerics.masked_whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_logprobs_of_and_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4)
    assert_close(numerics.logprobs_of(logits, torch.tensor([[1]])), torch.tensor([[math.log(0.75)]]))
    # at temperature 2 the logits become (0, log(3)/2): p(1) = sqrt(3) / (1 + sqrt(3))
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert_close(numerics.logprobs_of(logits, torch.tensor([[1]]), 2.0), torch.tensor([[expected]]))


def test_kl_estimators():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert_close(numerics.kl_per_token(lp, ref, "k1"), torch.tensor([math.log(2.0)]))
    # k3 = (r - 1) - log r with r = 0.25 / 0.5 = 0.5: -0.5 + log 2
    assert_close(numerics.kl_per_token(lp, ref, "k3"), torch.tensor([-0.5 + math.log(2.0)]))
    with pytest.raises(ValueError, match="k1"):
        numerics.kl_per_token(lp, ref, "k2")


def test_kl_penalized_rewards_puts_score_on_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = numerics.kl_penalized_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.5)
    assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2 + 2.0, 0.0, 0.0]]))


def test_gae_by_hand():
    # One sequence of 2 real tokens and 1 pad. gamma = 1, lambda = 0.5.
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])  # the 9 on padding must be ignored
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = numerics.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_1 = 1 + 0 - 0.25 = 0.75; A_1 = 0.75
    # delta_0 = 0 + 0.25 - 0.5 = -0.25; A_0 = -0.25 + 0.5 * 0.75 = 0.125
    assert_close(adv, torch.tensor([[0.125, 0.75, 0.0]]))
    assert_close(ret, torch.tensor([[0.625, 1.0, 0.0]]))


def test_adaptive_kl_controller():
    ctl = numerics.AdaptiveKLController(beta=0.1, target=6.0, horizon=100)
    # KL 12 is far above target: error clipped to 0.2, beta *= 1 + 0.2 * 10 / 100
    assert ctl.update(kl=12.0, n_steps=10) == pytest.approx(0.1 * 1.02)
    assert ctl.update(kl=3.0, n_steps=10) == pytest.approx(0.1 * 1.02 * (1 - 0.2 * 0.1))


def test_explained_variance():
    y = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.ones_like(y)
    assert_close(numerics.explained_variance(y, y, m), torch.tensor(1.0))
    assert_close(numerics.explained_variance(torch.full_like(y, 2.0), y, m), torch.tensor(0.0))


def test_response_mask_keeps_first_eos_only():
    eos = 0
    responses = torch.tensor([[5, 6, 0, 0, 0], [5, 0, 7, 0, 3], [5, 6, 7, 8, 9]])
    assert response_mask(responses, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_pad_left():
    ids, mask = pad_left([[1, 2, 3], [4]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_distinct_n():
    assert numerics.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)


def test_n_step_advantages_by_hand():
    # 3 real tokens and 1 pad; n = 2, gamma = 0.5
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 4.0, 9.0]])  # the 9 on padding must be ignored
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = numerics.n_step_advantages(rewards, values, mask, gamma=0.5, n=2)
    # R_0 = 1 + 0.5 * 0 + 0.25 * V_2 = 1 + 0.25 * 4 = 2
    # R_1 = 0 + 0.5 * 2 + 0.25 * V_3 (past the end: 0) = 1
    # R_2 = 2 + 0.5 * 0 + 0 = 2
    assert_close(ret, torch.tensor([[2.0, 1.0, 2.0, 0.0]]))
    assert_close(adv, torch.tensor([[1.5, 0.0, -2.0, 0.0]]))


def test_n_step_with_long_horizon_is_monte_carlo():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.3, 0.2, 0.1]])
    mask = torch.ones_like(rewards)
    _, ret = numerics.n_step_advantages(rewards, values, mask, gamma=1.0, n=10)
    _, gae_ret = numerics.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    assert_close(gae_ret, ret)  # GAE with lambda 1 is Monte Carlo too


def test_leave_one_out_and_group_advantages_by_hand():
    from rlhf_plugins.optimizers.grpo import group_advantages
    from rlhf_plugins.optimizers.rloo import leave_one_out_advantages

    returns = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # prompt 1: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    assert_close(leave_one_out_advantages(returns, 3), torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # prompt 1: mean 3, std (unbiased) sqrt(7); prompt 2: mean 1, std sqrt(3)
    expected = torch.tensor([-2 / 7**0.5, -1 / 7**0.5, 3 / 7**0.5, -1 / 3**0.5, -1 / 3**0.5, 2 / 3**0.5])
    assert_close(group_advantages(returns, 3, scale=True, eps=0.0), expected)
    assert_close(group_advantages(returns, 3, scale=False), torch.tensor([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]))
