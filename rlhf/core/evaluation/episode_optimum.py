"""The exact optimum of the KL-regularised objective over episodes, where the environment's
answers are random: the soft-Bellman policy, by backward induction.

With the KL over the policy's own turns only (the environment's answers are not the policy's
to choose), max_pi E[sum_t r_t] - beta KL(pi || pi_ref) is solved turn by turn:

    V*(s)    = beta log E_{a ~ pi_ref(.|s)} [ exp(Q*(s, a) / beta) ]
    Q*(s, a) = E_{o ~ P(.|s, a)} [ r(s, a, o) + V*(s, a, o) ]        (V* = 0 after the last turn)
    pi*(a|s) = pi_ref(a|s) exp((Q*(s, a) - V*(s)) / beta)

where a is a whole turn (every response the sampler can produce, enumerated as for single
turns) and o the environment's answer. KL(pi || pi*) over whole episodes is the expected sum,
over the decision points pi reaches, of KL(pi(.|s) || pi*(.|s)): `eval/kl_to_optimum`.

Tilting whole episodes instead, pi(tau) proportional to pi_ref(tau) exp(R(tau) / beta), is
the same recursion with Q(s, a) = beta log E_o[exp((r + V(s, a, o)) / beta)]: the log of an
expectation of exponentials, at least the expectation (Jensen), as if the policy chose the
environment's dice. `eval/kl_to_tilt` measures the distance to that optimistic policy, which
an objective built on whole-episode weights converges to.

The environment must say its answers' probabilities and rewards: `outcomes(history, action)`,
a list of (probability, answer, reward, done), `history` the prompt, then the actions and
answers so far as text (env=dice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhf.core.evaluation.optimum import response_distribution
from rlhf.core.model.policy import Policy
from rlhf.core.rollout.episodes import first_query, observation_ids

MAX_DECISIONS = 20_000  # decision points per prompt: beyond this the tree is too large to walk here


class _Zero:
    def score(self, queries, responses):
        return torch.zeros(len(responses))


@dataclass
class Node:
    """A decision point: what pi, pi_ref, pi* and the tilt do there, and its values."""

    history: tuple[str, ...]
    actions: list[str]
    log_pi: torch.Tensor  # (A,) float64
    log_ref: torch.Tensor
    q: torch.Tensor  # Q*(s, a)
    q_tilt: torch.Tensor  # the whole-episode tilt's Q
    v: float  # V*(s)
    v_tilt: float
    kl: float  # expected KL(pi || pi*) from here over the rest of the episode
    kl_tilt: float  # ... and to the tilted policy
    beta: float = 1.0
    # for each action, each answer: (probability, answer, reward, the next decision point or None)
    branches: list = field(default_factory=list)

    @property
    def log_star(self) -> torch.Tensor:
        return self.log_ref + (self.q - self.v) / self.beta

    @property
    def log_tilt(self) -> torch.Tensor:
        return self.log_ref + (self.q_tilt - self.v_tilt) / self.beta


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    p = log_p.exp()
    return float(torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum())


@torch.no_grad()
def solve(policy: Policy, env: Any, prompt_text: str, beta: float, gen: dict[str, Any], temperature: float) -> Node:
    """The soft-Bellman optimum of one prompt's episodes, and pi's expected KL to it."""
    tok = policy.tokenizer
    spec = env  # the plugin: it says the answers' probabilities (`outcomes`)
    decisions = [0]

    def visit(context: list[int], history: tuple[str, ...], turn: int) -> Node:
        decisions[0] += 1
        if decisions[0] > MAX_DECISIONS:
            raise ValueError(f"eval.kl_to_optimum: more than {MAX_DECISIONS:,} decision points per prompt; lower "
                             "env.turns, sampler.max_new_tokens or the environment's answers, or set eval.kl_to_optimum=false")
        d = response_distribution(policy, _Zero(), context, beta, gen, temperature)
        actions = d.texts
        q, q_tilt, exp_kl, exp_kl_tilt, branches = [], [], [], [], []
        for ids, text in zip(d.responses, actions):
            value = tilt = 0.0
            rest = rest_tilt = 0.0
            terms, branch = [], []
            for p, answer, r, done in spec.outcomes(history, text):
                if p <= 0:
                    continue
                if done or answer is None or turn + 1 >= spec.max_turns:
                    child = None
                else:
                    child = visit(context + list(ids) + observation_ids(tok, answer, spec.role),
                                  (*history, text.strip(), answer), turn + 1)
                branch.append((p, answer, r, child))
                v_next = child.v if child else 0.0
                v_next_tilt = child.v_tilt if child else 0.0
                value += p * (r + v_next)
                terms.append((p, r + v_next_tilt))
                rest += p * (child.kl if child else 0.0)
                rest_tilt += p * (child.kl_tilt if child else 0.0)
            top = max(x for _, x in terms)
            tilt = top + beta * math.log(sum(p * math.exp((x - top) / beta) for p, x in terms))
            q.append(value), q_tilt.append(tilt), exp_kl.append(rest), exp_kl_tilt.append(rest_tilt)
            branches.append(branch)
        q_t, q_tilt_t = torch.tensor(q, dtype=torch.float64), torch.tensor(q_tilt, dtype=torch.float64)
        v = float(beta * torch.logsumexp(d.log_ref + q_t / beta, 0))
        v_tilt = float(beta * torch.logsumexp(d.log_ref + q_tilt_t / beta, 0))
        log_star = d.log_ref + (q_t - v) / beta
        log_tilt = d.log_ref + (q_tilt_t - v_tilt) / beta
        pi = d.log_pi.exp()
        kl = _kl(d.log_pi, log_star) + float((pi * torch.tensor(exp_kl, dtype=torch.float64)).sum())
        kl_tilt = _kl(d.log_pi, log_tilt) + float((pi * torch.tensor(exp_kl_tilt, dtype=torch.float64)).sum())
        return Node(history, actions, d.log_pi, d.log_ref, q_t, q_tilt_t, v, v_tilt, kl, kl_tilt, beta, branches)

    first, _ = env.make().reset(seed=0, options={"prompt": prompt_text})  # (the toy's first observation is its prompt)
    return visit(first_query(tok, first), (str(first).strip(),), 0)


def episode_optimum(policy: Policy, env: Any, prompts: Sequence[list[int]], beta: float, gen: dict[str, Any],
                    temperature: float) -> list[Node]:
    """The root of each distinct prompt's solved tree."""
    tok = policy.tokenizer
    distinct = list(dict.fromkeys(tok.decode(list(p), skip_special_tokens=True) for p in prompts))
    return [solve(policy, env, text, beta, gen, temperature) for text in distinct]


def mean_kl(roots: Sequence[Node], tilt: bool = False) -> float:
    return sum(r.kl_tilt if tilt else r.kl for r in roots) / max(1, len(roots))
