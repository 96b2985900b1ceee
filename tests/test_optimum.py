"""The toy problem: the closed-form optimum, estimator bias, and every optimizer landing on pi*."""

import json
import math

import pytest
import torch
from conftest import cli, compose
from torch.testing import assert_close

from rlhf.contracts import registry
from rlhf.core.evaluation.optimum import distributions, kl_to_optimum
from rlhf.core.loop.trainer import Trainer
from rlhf.core.toolkit import numerics


def _toy(*overrides):
    cfg = compose("+experiment=toy_bandit", *overrides)
    return cfg, registry.instantiate("reward", cfg.reward)


def test_table_reward_and_its_errors():
    _, reward = _toy()
    assert reward.score(["x0", "x1", "x1"], ["y0", "y2", "x0"]).tolist() == [1.0, 1.0, -1.0]  # -1: not in the row
    with pytest.raises(ValueError, match="prompt 'x9' has no row"):
        reward.score(["x9"], ["y0"])


def test_closed_form_optimum_maximises_the_regularised_objective(tmp_path):
    cfg, reward = _toy("optimizer.beta=0.5")
    t = Trainer(cfg, tmp_path)
    prompt = t.eval_queries[0]
    log_pi, log_ref, log_star, r = distributions(t.policy, reward, prompt, beta=0.5)
    assert_close(log_pi, log_ref)  # LoRA at init: the policy is the reference
    # pi* = pi_ref exp(r / beta) / Z: log pi* - log pi_ref - r / beta is the same for every y
    offset = log_star - log_ref - r / 0.5
    assert_close(offset, offset[0].expand_as(offset))

    def objective(logp):  # E_pi[r] - beta KL(pi || pi_ref)
        p = logp.exp()
        return (p * r).sum() - 0.5 * (p * (logp - log_ref)).sum()

    best = objective(log_star)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # no perturbation of pi* does better
        assert objective(torch.log_softmax(log_star + 0.3 * torch.randn(log_star.shape, generator=g), -1)) < best
    # at init, KL(pi || pi*) = KL(pi_ref || pi*), and the trainer's figure is that, averaged over prompts
    by_hand = sum(
        (lr.exp() * (lr - ls)).sum().item()
        for lr, ls in (distributions(t.policy, reward, p, 0.5)[1:3] for p in {tuple(q): q for q in t.eval_queries}.values())
    ) / 2
    assert kl_to_optimum(t.policy, reward, t.eval_queries, 0.5) == pytest.approx(by_hand)


def test_kl_estimators_are_unbiased():
    """k1 and k3 averaged over many samples of p match the exact KL(p || q)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = (p * (p / q).log()).sum().item()
    y = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for est in ("k1", "k3"):
        mean = numerics.kl_per_token(p.log()[y], q.log()[y], est).mean().item()
        assert mean == pytest.approx(exact, abs=0.003), est
    assert (numerics.kl_per_token(p.log()[y], q.log()[y], "k3") >= 0).all()


def _gae_reference(rewards, values, gamma, lam):
    """GAE as written in the paper, one sequence at a time, with plain floats."""
    T, adv, last = len(rewards), [0.0] * len(rewards), 0.0
    for t in reversed(range(T)):
        next_v = values[t + 1] if t + 1 < T else 0.0
        last = rewards[t] + gamma * next_v - values[t] + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_and_whitening_match_straightforward_implementations():
    g = torch.Generator().manual_seed(1)
    rewards, values = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    lengths = [7, 3, 1, 5, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (7 - n) for n in lengths])
    adv, _ = numerics.gae(rewards * mask, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        assert_close(adv[i, :n], torch.tensor(_gae_reference(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.9, 0.8)))
        assert (adv[i, n:] == 0).all()
    flat = [x for i, n in enumerate(lengths) for x in rewards[i, :n].tolist()]
    mean = sum(flat) / len(flat)
    std = math.sqrt(sum((x - mean) ** 2 for x in flat) / (len(flat) - 1))
    white = numerics.masked_whiten(rewards, mask)
    assert_close(white[0], (rewards[0] - mean) / std, atol=1e-5, rtol=1e-5)


TOY_SWEEPS = {  # beta 0.1 is the hardest case (pi* nearly deterministic); the README has the full table
    "on-policy": ["+experiment=toy_bandit", "optimizer=ppo,a2c,reinforce,rloo,grpo", "optimizer.beta=0.1"],
    "dpo": ["+experiment=toy_bandit_dpo", "optimizer.beta=0.1,1.0"],
}


JOBS = {"on-policy": 2, "dpo": 1}  # run side by side: three single-threaded jobs keep both cores busy


@pytest.mark.slow
def test_optimizers_land_on_the_closed_form_optimum(tmp_path):
    """The README's commands, as sweeps of real runs (both sweeps at once): every run's
    summary has KL(pi || pi*) below 0.05."""
    from concurrent.futures import ThreadPoolExecutor

    def sweep(name: str):
        (tmp_path / name).mkdir()
        return name, cli("rlhf-train", "-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={JOBS[name]}",
                         *TOY_SWEEPS[name], "eval.every=1000", "threads=1", "hydra.sweep.dir=sw",
                         cwd=tmp_path / name, timeout=900)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(sweep, TOY_SWEEPS))
    missed = {}
    for name, r in results.items():
        assert r.returncode == 0, r.stderr[-3000:]
        jobs = [d for d in (tmp_path / name / "sw").iterdir() if (d / ".hydra").is_dir()]
        assert len(jobs) == {"on-policy": 5, "dpo": 2}[name]
        for d in jobs:
            kl = json.loads((d / "summary.json").read_text())["kl_to_optimum"]
            if not kl < 0.05:
                missed[(d / ".hydra" / "overrides.yaml").read_text().replace("\n", " ")] = kl
    assert not missed, missed
