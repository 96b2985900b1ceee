"""The closed-form optimum of the KL-regularised objective, for one-token responses.

max_pi E_{y~pi}[r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x)) is solved by
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x). With one-token responses every y is a
vocabulary entry, so pi*, and KL(pi || pi*), are computed exactly, with r taken from the
reward source itself on each decoded token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlhf.contracts.interfaces import RewardSource
from rlhf.core.policy import Policy


@torch.no_grad()
def distributions(policy: Policy, reward: RewardSource, prompt: list[int], beta: float, temperature: float = 1.0):
    """(log pi, log pi_ref, log pi*, r) over the whole vocabulary after `prompt`, each (V,)."""
    ids = torch.tensor([prompt], device=policy.device)
    mask = torch.ones_like(ids)
    q = ids.shape[1]
    # forward() gives the logits that predict positions q..; append a dummy token to get position q
    full = torch.cat([ids, ids[:, -1:]], 1)
    full_mask = torch.cat([mask, mask[:, -1:]], 1)
    logits, _ = policy.forward(full, full_mask, q, with_values=False)
    ref = policy.reference_logits(full, full_mask, q)
    # float64: KL(pi || pi*) near its minimum is a difference of nearly equal terms
    log_pi = torch.log_softmax(logits[0, 0].double() / temperature, -1)
    log_ref = torch.log_softmax(ref[0, 0].double() / temperature, -1)
    tok = policy.tokenizer
    vocab = range(log_pi.shape[0])
    query = tok.decode(prompt, skip_special_tokens=True)
    responses = [tok.decode([y], skip_special_tokens=True) for y in vocab]
    r = torch.as_tensor(reward.score([query] * len(vocab), responses), dtype=torch.float64).to(log_pi.device)
    log_star = torch.log_softmax(log_ref + r / beta, -1)
    return log_pi, log_ref, log_star, r


def kl_to_optimum(policy: Policy, reward: RewardSource, prompts: Sequence[list[int]], beta: float,
                  temperature: float = 1.0) -> float:
    """Mean over distinct prompts of KL(pi(.|x) || pi*(.|x)), in nats."""
    kls = []
    for prompt in {tuple(p) for p in prompts}:
        log_pi, _, log_star, _ = distributions(policy, reward, list(prompt), beta, temperature)
        kls.append((log_pi.exp() * (log_pi - log_star)).sum().item())
    return sum(kls) / len(kls)
