"""Shared numerics: masked statistics, log-probs, KL estimators, GAE.

Small pure functions on tensors, each tested against hand-derived numbers.
"""

from __future__ import annotations

import torch

from rlhf.contracts.metrics import MISMATCH_ESS, MISMATCH_KL, MISMATCH_OUTSIDE


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is 1, over everything or along `dim`."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as zero.

    `reduce` sums a tensor over the data-parallel ranks (rlhf.core.parallel.distributed.all_sum), so the
    statistics are those of the whole batch, not of this rank's share.
    """
    if reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        n = reduce(mask.sum())
        mean = reduce((x * mask).sum()) / n.clamp(min=1)
        var = reduce(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) gathered at `tokens`. (B, T, V), (B, T) -> (B, T)."""
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    # logsumexp + gather avoids materialising the (B, T, V) log-softmax twice
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() if temperature == 1.0 else logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples y ~ pi (Schulman, "Approximating KL").

    k1 = log pi - log pi_ref: unbiased, high variance, can be negative.
    k3 = (r - 1) - log r with r = pi_ref / pi: unbiased, always >= 0, lower variance.
    """
    return kl_estimate(logprobs - ref_logprobs, estimator)


def kl_estimate(log_ratio: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """kl_per_token from the log ratio log pi - log pi_ref (a rollout's `log_ratio`)."""
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


def kl_penalized_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float, token_scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token rewards r_t = -beta * kl_t, plus the score on the last response token; an
    episode's rewards where they fell instead (`token_scores`, each turn's on its last token).

    scores: (B,), kl: (B, T), mask: (B, T), token_scores: (B, T) or None -> (B, T)
    """
    rewards = -beta * kl * mask
    if token_scores is not None:
        return rewards + token_scores
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of the last real response token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def has_gaps(mask: torch.Tensor) -> bool:
    """Whether any row's 1s are not one run from its start (an episode: the environment's tokens
    between the policy's turns)."""
    return bool((mask[:, 1:] > mask[:, :-1]).any()) if mask.shape[1] > 1 else False


def packed(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (B, T), packed mask (B, T)): gathering with `index` moves each row's masked
    positions to its front, in order; the packed mask is 1 on them."""
    T = mask.shape[1]
    key = (mask <= 0).long() * T + torch.arange(T, device=mask.device)  # masked positions first, in order
    index = key.argsort(1)
    return index, mask.gather(1, index)


def over_policy_tokens(fn, rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *args):
    """`fn` (gae, n_step_advantages) over each row's masked tokens alone, as if they were
    consecutive: an episode's advantages run across its turns over the policy's tokens, the
    environment's tokens between them are no steps (their advantages and returns are 0)."""
    if not has_gaps(mask):
        return fn(rewards, values, mask, *args)
    index, pmask = packed(mask)
    a, r = fn(rewards.gather(1, index), values.gather(1, index), pmask, *args)
    out_a, out_r = torch.zeros_like(rewards), torch.zeros_like(rewards)
    return out_a.scatter(1, index, a * pmask), out_r.scatter(1, index, r * pmask)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    delta_t = r_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lam A_{t+1};
    the value after the last real token (and on padding) is zero.
    Returns (advantages, returns = advantages + values), both (B, T) and zero on padding.
    """
    values = values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def batch_mean(x: torch.Tensor, reduce=None) -> torch.Tensor:
    """Mean over the whole batch: with `reduce` (a sum over data-parallel ranks), over every rank's rows."""
    if reduce is None:
        return x.mean()
    return reduce(x.sum()) / reduce(torch.tensor(float(x.numel()), device=x.device))


def means(stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Each list of scalar tensors averaged, moved to the host once at the end."""
    if not stats:
        return {}
    names = list(stats)
    values = torch.stack([torch.stack([v.float() for v in stats[n]]).mean() for n in names]).tolist()
    return dict(zip(names, values))


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[target - pred] / Var[target] over masked entries (1 is perfect, <= 0 useless)."""
    var_y = masked_var(target, mask)
    return 1 - masked_var(target - pred, mask) / var_y.clamp(min=1e-8)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens (Li et al. 2016)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 2) -> float:
    """The share of a text's word n-grams that repeat an earlier one of the same text (0: none
    repeats; "was was was was" -> 2/3)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


class AdaptiveKLController:
    """beta_{k+1} = beta_k (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


def n_step_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n-step returns R_t = sum_{k<n} gamma^k r_{t+k} + gamma^n V_{t+n}, A_t = R_t - V_t.

    Rewards and values past the last real token are zero. Returns (advantages, returns).
    """
    T = rewards.shape[1]
    values = values * mask
    r = torch.nn.functional.pad(rewards * mask, (0, n))
    v = torch.nn.functional.pad(values, (0, n))
    returns = sum(gamma**k * r[:, k : k + T] for k in range(n)) + gamma**n * v[:, n : n + T]
    return (returns - values) * mask, returns * mask


# ---------------------------------------------------------------- importance weights: samples of q, expectations under pi


def importance_weights(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor, kind: str, cap: float) -> torch.Tensor:
    """Per-token weights that turn an average over samples of q into one over pi. (B, T) each -> (B, T)

    sequence:     W = pi(y) / q(y) = exp(sum_t log pi - log q) on every token of y: exact (E_q[W f] = E_pi[f]
                  for any f of the whole response), and of high variance when q is far from pi;
    sequence_mis: W where 1/cap <= W <= cap, else 0 (the response masked out): biased, bounded;
    token_tis:    min(pi(y_t) / q(y_t), cap) per token (truncated IS): biased, low variance;
    none:         1 (valid only when q = pi).
    """
    if kind == "none":
        return mask.clone()
    log_ratio = ((logp - logq) * mask).double()
    if kind == "token_tis":
        return (log_ratio.exp().clamp(max=cap) * mask).to(logp.dtype)
    w = log_ratio.sum(1, keepdim=True).exp()  # (B, 1)
    if kind == "sequence_mis":
        w = torch.where((w >= 1 / cap) & (w <= cap), w, torch.zeros_like(w))
    return (w * mask).to(logp.dtype)


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / (n sum w^2) of a weight vector: 1 when every weight is equal, 1/n when one
    sample carries them all. (n,) -> ()"""
    return w.sum() ** 2 / (w.numel() * (w**2).sum()).clamp(min=1e-30)


@torch.no_grad()
def mismatch(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the proposal q that drew the tokens is from pi: the mean per-token KL(q || pi)
    (the k3 estimate on q's samples, (r - 1) - log r with r = pi / q), the share of tokens whose
    ratio leaves [0.5, 2], and the effective sample size of the sequence weights (a share of B)."""
    log_r = (logp - logq) * mask
    r = log_r.exp()
    outside = ((r < 0.5) | (r > 2.0)).float()
    seq = log_r.double().sum(1)
    w = (seq - seq.max()).exp()  # the weights up to a common factor, which the ESS does not see
    return {MISMATCH_KL: masked_mean((r - 1) - log_r, mask).item(), MISMATCH_OUTSIDE: masked_mean(outside, mask).item(),
            MISMATCH_ESS: effective_sample_size(w).item()}
