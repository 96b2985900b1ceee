"""Rollouts drawn by a proposal q != pi, corrected to pi: the importance weights checked by
enumeration (every response listed, no sampling) on a tabular two-token policy, the effective
sample size by hand, exact log q under truncation and mixing, and the proposals in real runs."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from conftest import cli, deterministic_rows

from rlhf.contracts.interfaces import Rollout
from rlhf.core.rollout import collect, sampling
from rlhf.core.toolkit import numerics

V = 3  # tokens; responses are every pair of them: 9, listed


class Tabular(torch.nn.Module):
    """pi(y1, y2) = softmax(a)[y1] softmax(b[y1])[y2]: a policy whose every response can be listed,
    with the TrainablePolicy view the optimizers use (the query is one token, ignored)."""

    temperature = 1.0

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(V, generator=g))
        self.b = torch.nn.Parameter(torch.randn(V, V, generator=g))

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """The next-token logits at both positions. (B, 2) -> (B, 2, V)"""
        return torch.stack([self.a.expand(len(y), V), self.b[y[:, 0]]], 1)

    def token_logprobs(self, input_ids, attention_mask, query_len, temperature=1.0, with_values=True, with_entropy=False):
        y = input_ids[:, query_len:]
        logp = torch.log_softmax(self.logits(y) / temperature, -1)
        entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
        return logp.gather(-1, y[..., None]).squeeze(-1), None, entropy


RESPONSES = torch.tensor(list(itertools.product(range(V), repeat=2)))  # (9, 2)
REWARD = torch.tensor([0.3, -1.0, 2.0, 0.0, 1.5, -0.5, 0.7, 0.1, -2.0])


def batch(policy: Tabular, logq: torch.Tensor) -> Rollout:
    """Every response once, with log pi_old (the policy's, detached) and log q."""
    ids = torch.cat([torch.zeros(len(RESPONSES), 1, dtype=torch.long), RESPONSES], 1)
    with torch.no_grad():
        logp, _, _ = policy.token_logprobs(ids, torch.ones_like(ids), 1)
    mask = torch.ones(len(RESPONSES), 2)
    return Rollout(input_ids=ids, attention_mask=torch.ones_like(ids), query_len=1, mask=mask, logprobs=logp,
                   ref_logprobs=logp.clone(), values=None, scores=REWARD.clone(), queries=[""] * 9, responses=[""] * 9,
                   proposal_logprobs=logq)


def expected_gradient(policy: Tabular, b: Rollout, probs: torch.Tensor, kind: str, cap: float = 2.0) -> torch.Tensor:
    """sum_y probs(y) * the gradient of REINFORCE's loss on y alone (advantage r(y), the plugin's
    loss through the core's weights): the exact expectation of one sample's update."""
    from rlhf.core.toolkit.objectives import sequence_policy_gradient

    w = numerics.importance_weights(b.logprobs, b.proposal_logprobs, b.mask, kind, cap)
    total = torch.zeros(V + V * V, dtype=torch.float64)
    for i in range(len(RESPONSES)):
        row, _ = collect.minibatch(b, torch.tensor([i]))
        policy.zero_grad()
        row = dataclasses.replace(row, is_weight=w[i : i + 1])  # as the core sets a rollout's weights
        sequence_policy_gradient(policy, row, row.scores).loss.backward()
        total += probs[i].double() * torch.cat([policy.a.grad.flatten(), policy.b.grad.flatten()]).double()
    return total


def proposal_logq(policy: Tabular, gen: dict) -> torch.Tensor:
    """log q of every response's two tokens under the sampling distribution `gen` (the sampling
    loop's own function: temperature, top-k, top-p, uniform mixing). (9, 2)"""
    with torch.no_grad():
        logits = policy.logits(RESPONSES)  # (9, 2, V)
        return torch.stack([sampling.sampling_log_probs(logits[:, t], gen).gather(-1, RESPONSES[:, t : t + 1]).squeeze(-1)
                            for t in range(2)], 1)


PROPOSALS = {  # an exploring temperature, uniform mixing, truncation made full-support by mixing
    "hot": {"temperature": 2.5},
    "mixed": {"temperature": 1.0, "mix_uniform": 0.3},
    "truncated": {"temperature": 1.5, "top_k": 2, "mix_uniform": 0.1},
}


@pytest.mark.parametrize("name", sorted(PROPOSALS))
def test_the_exact_correction_turns_the_proposals_expected_gradient_into_the_on_policy_one(name):
    policy = Tabular(seed=0)
    logq = proposal_logq(policy, PROPOSALS[name])
    b = batch(policy, logq)
    pi, q = b.logprobs.sum(1).exp(), logq.sum(1).exp()
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-6) and float(pi.sum()) == pytest.approx(1.0, abs=1e-6)
    on_policy = expected_gradient(policy, batch(policy, b.logprobs.clone()), pi, "none")
    corrected = expected_gradient(policy, b, q, "sequence")
    uncorrected = expected_gradient(policy, b, q, "none")
    assert on_policy.abs().max() > 0.05
    assert torch.allclose(corrected, on_policy, atol=1e-6), (corrected - on_policy).abs().max()
    assert (uncorrected - on_policy).abs().max() > 0.01  # q's samples, uncorrected: another gradient


def test_the_truncated_corrections_bias_is_the_derived_one():
    """token_tis: each token's ratio rho_t = pi_t / q_t capped at c. For y = (y1, y2) the loss's
    gradient is -r(y) (min(rho_1, c) g_1 + min(rho_2, c) g_2), g_t = grad log pi_t; so its
    expectation under q is -sum_y q(y) r(y) sum_t min(rho_t, c) g_t, and the bias against
    on-policy is -sum_y r(y) sum_t (q(y) min(rho_t, c) - pi(y)) g_t: nothing where every
    rho_t <= c. sequence_mis: responses whose weight pi(y) / q(y) leaves [1/c, c] drop out, so
    the expectation is the on-policy one over the kept responses alone."""
    policy, c = Tabular(seed=1), 1.1
    logq = proposal_logq(policy, PROPOSALS["hot"])
    b = batch(policy, logq)
    pi, q = b.logprobs.sum(1).exp().double(), logq.sum(1).exp().double()
    rho = (b.logprobs - logq).exp().double()  # (9, 2)
    grads = []  # g_t for each response and token, by hand from the tabular policy
    for y1, y2 in RESPONSES.tolist():
        p1, p2 = torch.softmax(policy.a, 0).detach().double(), torch.softmax(policy.b[y1], 0).detach().double()
        g1 = torch.zeros(V + V * V, dtype=torch.float64)
        g1[:V] = torch.nn.functional.one_hot(torch.tensor(y1), V).double() - p1
        g2 = torch.zeros(V + V * V, dtype=torch.float64)
        g2[V + V * y1 : V + V * (y1 + 1)] = torch.nn.functional.one_hot(torch.tensor(y2), V).double() - p2
        grads.append((g1, g2))
    derived = -sum(q[i] * REWARD[i].double() * (rho[i, 0].clamp(max=c) * grads[i][0] + rho[i, 1].clamp(max=c) * grads[i][1])
                   for i in range(9))
    assert torch.allclose(expected_gradient(policy, b, q, "token_tis", c), derived, atol=1e-6)
    assert (rho > c).any()  # the cap binds somewhere: the bias is not zero
    w = pi / q
    kept = (w >= 1 / c) & (w <= c)
    assert 0 < int(kept.sum()) < 9
    on_policy_kept = -sum(pi[i] * REWARD[i].double() * (grads[i][0] + grads[i][1]) for i in range(9) if kept[i])
    assert torch.allclose(expected_gradient(policy, b, q, "sequence_mis", c), on_policy_kept, atol=1e-6)


def test_a_ratio_against_the_untruncated_distribution_is_biased_where_the_exact_log_q_is_not():
    """A truncated proposal (top-k, mixed with uniform tokens so that every response stays
    possible): E_q[(pi / q) f] = E_pi[f] with q the distribution that really drew the tokens;
    with the untruncated, unmixed softmax at the same temperature in its place (what a sampler's
    own log-probs give), the estimate is off."""
    policy = Tabular(seed=2)
    gen = PROPOSALS["truncated"]
    logq = proposal_logq(policy, gen)
    with torch.no_grad():
        logits = policy.logits(RESPONSES)
        untruncated = torch.stack([torch.log_softmax(logits[:, t] / gen["temperature"], -1)
                                   .gather(-1, RESPONSES[:, t : t + 1]).squeeze(-1) for t in range(2)], 1)
    b = batch(policy, logq)
    pi, q = b.logprobs.sum(1).exp().double(), logq.sum(1).exp().double()
    target = float((pi * REWARD.double()).sum())  # E_pi[r]
    exact = float((q * (pi / q) * REWARD.double()).sum())
    wrong = float((q * (pi / untruncated.sum(1).exp().double()) * REWARD.double()).sum())
    assert exact == pytest.approx(target, abs=1e-9)
    assert abs(wrong - target) > 0.05, (wrong, target)


def test_effective_sample_size_by_hand():
    assert numerics.effective_sample_size(torch.tensor([1.0, 1.0, 2.0])).item() == pytest.approx(16 / 18)
    assert numerics.effective_sample_size(torch.tensor([3.0, 3.0, 3.0, 3.0])).item() == pytest.approx(1.0)
    assert numerics.effective_sample_size(torch.tensor([1.0, 0.0, 0.0, 0.0])).item() == pytest.approx(0.25)
    m = numerics.mismatch(torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.5, 0.1]])), torch.ones(1, 2))
    # ratios 1 and 2: k3 = (r - 1) - log r = 0 and 1 - log 2; none outside [0.5, 2] (2 is inside); one response
    assert m["mismatch/kl"] == pytest.approx((1 - torch.log(torch.tensor(2.0)).item()) / 2)
    assert m["mismatch/outside"] == 0.0 and m["mismatch/ess"] == pytest.approx(1.0)


TOY = ["+experiment=toy_sequences", "train.steps=4", "train.batch_size=16", "eval.every=4", "threads=1",
       "train.lr_schedule=constant"]


@pytest.mark.parametrize("proposal", [["proposal=explore", "proposal.temperature=2.0", "proposal.mix_uniform=0.1"],
                                      ["proposal=stale", "proposal.k=2"]])
def test_a_run_drawn_by_another_proposal_logs_its_mismatch_and_resumes_exactly(proposal, tmp_path):
    args = [*TOY, "optimizer=reinforce", "optimizer.correction=sequence", "checkpoint.every=2", *proposal]
    r = cli("rlhf-train", *args, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = deterministic_rows(tmp_path / "a" / "metrics.jsonl")
    train = [row for row in rows if "train/reward" in row]
    assert all({"mismatch/kl", "mismatch/outside", "mismatch/ess"} <= set(row) for row in train)
    assert train[-1]["mismatch/kl"] > 0 and 0 < train[-1]["mismatch/ess"] <= 1
    # stopped after step 2 and resumed: the proposal's state (a stale policy's kept weights) comes along
    r = cli("rlhf-train", *args, "train.steps=2", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("rlhf-train", f"resume={tmp_path / 'b'}", "train.steps=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = deterministic_rows(tmp_path / "b" / "metrics.jsonl")
    assert [row for row in resumed if "train/reward" in row] == train
