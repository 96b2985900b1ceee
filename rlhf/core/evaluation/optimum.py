"""The closed-form optimum of the KL-regularised objective, over whole responses.

max_pi E_{y~pi}[r(x, y)] - beta KL(pi(.|x) || pi_ref(.|x)) is solved by
pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), where y is a whole response. For a small
vocabulary and a short length cap every response the sampler can produce is enumerated:
every token sequence that ends at the first EOS, and every sequence cut at max_new_tokens,
exactly as the sampling loop cuts them. Their probabilities come from the real model's
forward passes, one batched pass per depth of the tree of prefixes (a prefix's next-token
distribution is computed once for all its continuations), the rewards from the reward source
itself on the decoded text, so pi*, and KL(pi || pi*), are exact. One-token responses are
the case max_new_tokens=1: the tree is one softmax.

pi is what the sampler draws (its temperature, top-k and top-p); pi_ref is the reference's
softmax at the training temperature, as the KL penalty uses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhf.contracts.interfaces import RewardSource
from rlhf.core.model.policy import Policy
from rlhf.core.rollout.collect import score
from rlhf.core.rollout.sampling import SAMPLING_LOOP_KEYS, sampling_log_probs, sampling_loop_handles

MAX_RESPONSES = 200_000  # per prompt: beyond this the tree is too large to enumerate here
ROWS_PER_PASS = 2048  # prefixes per forward pass
SCORES_PER_CALL = 1024  # responses per reward.score() call


def response_count(vocab: int, max_new_tokens: int, has_eos: bool) -> int:
    """How many distinct responses a sampler can produce: sequences ending at EOS (1 to
    max_new_tokens tokens, EOS included) plus those cut at the cap."""
    branching = vocab - 1 if has_eos else vocab
    stopped = sum(branching**d for d in range(max_new_tokens)) if has_eos else 0
    return stopped + branching**max_new_tokens


def _levels(vocab: int, max_new_tokens: int, eos: int | None):
    """The tree of responses, depth by depth: (prefixes not yet ended, their children token by
    token, whether each child ends there: at `eos` or at the cap)."""
    live = [()]
    for depth in range(max_new_tokens):
        children = [(*p, v) for p in live for v in range(vocab)]
        ends = [depth + 1 == max_new_tokens or c[-1] == eos for c in children]
        yield live, children, ends
        live = [c for c, e in zip(children, ends) if not e]
        if not live:
            return


def all_responses(vocab: int, max_new_tokens: int, eos: int | None) -> list[tuple[int, ...]]:
    """Every response, in the order the enumeration lists them: by length, then token by
    token; those that stop end with `eos`. One-token responses are range(vocab)."""
    return [c for _, children, ends in _levels(vocab, max_new_tokens, eos) for c, e in zip(children, ends) if e]


def check_sampler(gen: dict[str, Any]) -> None:
    """Raise ValueError when the sampler's distribution is not the core sampling loop's."""
    if not sampling_loop_handles(gen):
        others = sorted(k for k in gen if k not in SAMPLING_LOOP_KEYS) + [
            f"{k}={gen[k]}" for k, off in (("num_beams", 1), ("repetition_penalty", 1.0), ("min_new_tokens", 0))
            if gen.get(k, off) not in (off, None)]
        raise ValueError(f"eval.kl_to_optimum enumerates what the core's sampling loop draws; sampler settings "
                         f"{', '.join(others)} go to transformers' generate instead: leave them at their defaults")


def check_enumerable(vocab: int, gen: dict[str, Any], has_eos: bool, limit: int = MAX_RESPONSES) -> None:
    """Raise ValueError, naming the count and the fix, when eval.kl_to_optimum cannot be exact."""
    check_sampler(gen)
    n = response_count(vocab, gen.get("max_new_tokens", 20), has_eos)
    if n > limit:
        raise ValueError(
            f"eval.kl_to_optimum: sampler.max_new_tokens={gen.get('max_new_tokens', 20)} over a vocabulary of {vocab} tokens "
            f"means {n:,} distinct responses per prompt, more than the {limit:,} that can be enumerated; lower "
            "sampler.max_new_tokens or use a model with a smaller vocabulary (the toy models), or set eval.kl_to_optimum=false"
        )


@dataclass
class ResponseDistribution:
    """Every response to one prompt with its probability under pi, pi_ref and pi*, and its reward."""

    prompt: list[int]
    query: str
    responses: list[tuple[int, ...]]  # token ids, the EOS included where the response stopped
    texts: list[str]  # as the reward source saw them
    log_pi: torch.Tensor  # (N,) float64
    log_ref: torch.Tensor
    reward: torch.Tensor
    beta: float
    log_star: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.log_star = torch.log_softmax(self.log_ref + self.reward / self.beta, -1)

    def kl(self) -> float:
        """KL(pi || pi*) in nats; responses pi never produces add nothing."""
        p = self.log_pi.exp()
        terms = torch.where(p > 0, p * (self.log_pi - self.log_star), torch.zeros_like(p))
        return float(terms.sum())

    def top(self, k: int = 5) -> list[dict[str, Any]]:
        """The k most likely responses under pi* (then pi, then pi_ref), with the three probabilities."""
        rank = torch.stack([self.log_star, self.log_pi, self.log_ref]).exp().amax(0)
        rows = rank.argsort(descending=True)[:k].tolist()
        return [{"response": self.texts[i], "tokens": len(self.responses[i]), "reward": float(self.reward[i]),
                 "pi_ref": float(self.log_ref[i].exp()), "pi": float(self.log_pi[i].exp()),
                 "pi_star": float(self.log_star[i].exp())} for i in rows]


def mean_kl(dists: Sequence[ResponseDistribution]) -> float:
    """KL(pi || pi*) averaged over prompts, in nats."""
    return sum(d.kl() for d in dists) / max(1, len(dists))


@torch.no_grad()
def response_distribution(policy: Policy, reward: RewardSource, prompt: list[int], beta: float, gen: dict[str, Any],
                          temperature: float, limit: int = MAX_RESPONSES) -> ResponseDistribution:
    """Enumerate every response to `prompt` the sampler with settings `gen` can produce."""
    tok = policy.tokenizer
    eos = tok.eos_token_id
    cap = gen.get("max_new_tokens", 20)
    vocab = policy.vocab_size
    check_enumerable(vocab, gen, eos is not None, limit)
    live_pi = live_ref = torch.zeros(1, dtype=torch.float64)  # log-probabilities of the prefixes not yet ended
    responses, log_pi, log_ref = [], [], []
    for live, children, ends in _levels(vocab, cap, eos):
        step_pi, step_ref = _next_token(policy, prompt, live, gen, temperature)  # (P, V) each
        child_pi = (live_pi[:, None] + step_pi).flatten()
        child_ref = (live_ref[:, None] + step_ref).flatten()
        stop = torch.tensor(ends)
        responses += [c for c, e in zip(children, ends) if e]
        log_pi.append(child_pi[stop])
        log_ref.append(child_ref[stop])
        live_pi, live_ref = child_pi[~stop], child_ref[~stop]
    query = tok.decode(prompt, skip_special_tokens=True)
    texts = [tok.decode(list(r), skip_special_tokens=True) for r in responses]
    r = torch.cat([score(reward, [query] * len(texts[i : i + SCORES_PER_CALL]), texts[i : i + SCORES_PER_CALL],
                         torch.device("cpu")).double() for i in range(0, len(texts), SCORES_PER_CALL)])
    return ResponseDistribution(list(prompt), query, responses, texts, torch.cat(log_pi), torch.cat(log_ref), r, beta)


def _next_token(policy: Policy, prompt: list[int], prefixes: list[tuple[int, ...]], gen: dict[str, Any],
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the next token after prompt + each prefix (all of one length):
    under the sampler's draw (pi) and under the reference at `temperature`. (P, V) float64, on the CPU."""
    out_pi, out_ref = [], []
    q = len(prompt)
    for i in range(0, len(prefixes), ROWS_PER_PASS):
        rows = prefixes[i : i + ROWS_PER_PASS]
        # forward() gives the logits that predict positions q..; a dummy last token gives the next position's
        ids = torch.tensor([[*prompt, *p, 0] for p in rows], device=policy.device)
        mask = torch.ones_like(ids)
        logits, _ = policy.forward(ids, mask, q, with_values=False)
        ref = policy.reference_logits(ids, mask, q)
        # float64: KL(pi || pi*) near its minimum is a difference of nearly equal terms
        out_pi.append(sampling_log_probs(logits[:, -1].double(), gen).cpu())
        out_ref.append(torch.log_softmax(ref[:, -1].double() / temperature, -1).cpu())
    return torch.cat(out_pi), torch.cat(out_ref)


def distributions(policy: Policy, reward: RewardSource, prompt: list[int], beta: float, temperature: float = 1.0):
    """One-token responses: (log pi, log pi_ref, log pi*, r), each (V,) in vocabulary order."""
    d = response_distribution(policy, reward, prompt, beta, {"max_new_tokens": 1, "temperature": temperature}, temperature)
    return d.log_pi, d.log_ref, d.log_star, d.reward


def optimum(policy: Policy, reward: RewardSource, prompts: Sequence[list[int]], beta: float, gen: dict[str, Any],
            temperature: float) -> list[ResponseDistribution]:
    """The exact distributions for each distinct prompt, in first-seen order."""
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    return [response_distribution(policy, reward, list(p), beta, gen, temperature) for p in distinct]


def kl_to_optimum(policy: Policy, reward: RewardSource, prompts: Sequence[list[int]], beta: float,
                  temperature: float = 1.0, gen: dict[str, Any] | None = None) -> float:
    """Mean over distinct prompts of KL(pi(.|x) || pi*(.|x)) over whole responses, in nats."""
    gen = gen or {"max_new_tokens": 1, "temperature": temperature}
    return mean_kl(optimum(policy, reward, prompts, beta, gen, temperature))


def table_record(dists: Sequence[ResponseDistribution], step: int, k: int = 5) -> dict[str, Any]:
    """What optimum.json holds: per prompt, KL(pi || pi*) and the k most likely responses
    under pi_ref, pi and pi*."""
    return {"step": step, "beta": dists[0].beta if dists else None,
            "kl_to_optimum": mean_kl(dists),
            "prompts": [{"prompt": d.query, "responses": len(d.responses), "kl_to_optimum": d.kl(), "top": d.top(k)}
                        for d in dists]}


def format_table(record: dict[str, Any]) -> str:
    """optimum.json as text: per prompt, its most likely responses with pi_ref, pi and pi*."""
    lines = [f"pi_ref, the trained pi and the optimum pi* (beta {record['beta']}, step {record['step']}): "
             f"KL(pi || pi*) = {record['kl_to_optimum']:.4g} nats"]
    for p in record["prompts"]:
        lines.append(f"  prompt {p['prompt']!r} ({p['responses']} responses, KL {p['kl_to_optimum']:.3g})")
        lines.append(f"    {'response':<18} {'reward':>7} {'pi_ref':>7} {'pi':>7} {'pi*':>7}")
        for row in p["top"]:
            shown = repr(row["response"]) if row["response"] else "'' (EOS)"
            lines.append(f"    {shown:<18} {row['reward']:>7.3f} {row['pi_ref']:>7.3f} {row['pi']:>7.3f} {row['pi_star']:>7.3f}")
    return "\n".join(lines)
