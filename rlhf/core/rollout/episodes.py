"""Episodes: a policy turn, the environment's (or a tool's) answer, another turn, rewards per
turn or at the end; a single-turn rollout is an episode of one turn (and keeps its own path,
`collect.collect`).

Token in, token out: the ids the policy sampled are the ids trained on. An episode's tokens
are kept as a list that only grows: each turn's sampled ids are appended as they were drawn,
and each answer of the environment is tokenised once and appended (with a chat template, as
the template writes a new message after the assistant's: its turn markers and the text,
`observation_ids`). Nothing is ever re-rendered from text, so a template that rewrites the
history (one that drops earlier turns' reasoning) cannot change what was sampled; the
`episode/retokenize_drift` metric shows, per batch, how many episodes re-rendering the text
would have changed.

The rollout's `mask` is 1 on the policy's tokens only: the loss, the KL penalty, the entropy
and every token mean see the policy's tokens and nothing else (the environment's are
context). `token_scores` holds each turn's reward on that turn's last token; `scores` is the
episode's total. A proposal other than the policy draws each turn (log q of the policy's
tokens only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlhf.contracts.interfaces import Environment, RewardSource, Rollout, Sampling
from rlhf.contracts.metrics import (
    EPISODE_RETOKENIZE_DRIFT,
    EPISODE_TOOL_CALLS,
    EPISODE_TOOL_ERRORS,
    EPISODE_TRUNCATED,
    EPISODE_TURN_REWARD,
    EPISODE_TURNS,
)
from rlhf.core.loop.phases import phase
from rlhf.core.model.policy import Policy
from rlhf.core.rollout.collect import columns_of, score
from rlhf.core.rollout.data import first_query, observation_ids
from rlhf.core.rollout.sampling import generate, pad_left


@dataclass
class Episode:
    """One episode as it is played: its query, the tokens after it, which of them are the policy's."""

    env: Any
    query: list[int]
    body: list[int] = field(default_factory=list)
    policy: list[int] = field(default_factory=list)  # 1: a policy token, 0: the environment's
    log_q: list[float] = field(default_factory=list)
    rewards: list[tuple[int, float]] = field(default_factory=list)  # (position in body, reward)
    turns: int = 0
    done: bool = False
    truncated: bool = False
    tool_calls: int = 0
    tool_errors: int = 0
    sampled: list[list[int]] = field(default_factory=list)  # each turn's ids as the sampler drew them


@torch.no_grad()
def play(policy: Policy, reward: RewardSource, env: Environment, prompts: Sequence[list[int]], sampling: Sampling,
         with_values: bool = True, rows: tuple[int, int] | None = None, proposal: Any = None) -> Rollout:
    """One episode for each prompt (its text is the environment's `options["prompt"]`), played to
    its end or to `env.max_turns` policy turns; a Rollout of them (module doc)."""
    tok = policy.tokenizer
    offset = (rows or (0, len(prompts)))[0]
    seed = int(torch.randint(2**31 - 1, (1,)))  # the episodes' environments are seeded from torch's stream
    episodes = []
    with phase("environment"):
        for i, p in enumerate(prompts):
            e = env.make()
            fields = dict(getattr(p, "fields", {}) or {})
            obs, _ = e.reset(seed=seed + offset + i, options={"prompt": tok.decode(list(p), skip_special_tokens=True),
                                                              **fields})
            episodes.append(Episode(e, first_query(tok, obs)))
    off_policy = proposal is not None and not proposal.is_policy
    cap, limit = sampling.kwargs.get("max_new_tokens", 20), policy.context_length
    for turn in range(env.max_turns):
        live = [e for e in episodes if not e.done]
        for e in live:  # no room for another turn: cut here
            if limit is not None and len(e.query) + len(e.body) + cap > limit:
                e.done = e.truncated = True
        live = [e for e in live if not e.done]
        if not live:
            break
        contexts = [e.query + e.body for e in live]
        part = rows if turn == 0 and len(live) == len(episodes) else None
        with phase("sampling"):
            g = (proposal.sample(policy, contexts, sampling, False, part) if off_policy
                 else generate(policy, contexts, sampling.generation_kwargs(), sampling.temperature, False, part))
        for j, e in enumerate(live):
            keep = g.mask[j].bool()
            ids = g.input_ids[j, g.query_len:][keep].tolist()
            e.sampled.append(ids)
            e.body += ids
            e.policy += [1] * len(ids)
            e.log_q += g.sampled_logprobs[j][keep].tolist() if off_policy else [0.0] * len(ids)
            e.turns += 1
            with phase("environment"):
                obs, r, terminated, truncated, info = e.env.step(tok.decode(ids, skip_special_tokens=True))
            e.rewards.append((len(e.body) - 1, float(r)))
            e.tool_calls += int(bool((info or {}).get("tool_call")))
            e.tool_errors += int(bool((info or {}).get("error")))
            if terminated or truncated or turn + 1 == env.max_turns:
                e.done = True
                e.truncated = bool(truncated) or (not terminated and turn + 1 == env.max_turns)
                continue
            answer = observation_ids(tok, obs, env.role)
            e.body += answer
            e.policy += [0] * len(answer)
            e.log_q += [0.0] * len(answer)
    return _rollout(policy, reward, episodes, prompts, sampling.temperature, with_values, off_policy)


def _rollout(policy: Policy, reward: RewardSource, episodes: list[Episode], prompts: Sequence[list[int]],
             temperature: float, with_values: bool, off_policy: bool) -> Rollout:
    tok, device = policy.tokenizer, policy.device
    pad = tok.pad_token_id
    q_ids, q_mask = pad_left([e.query for e in episodes], pad, device)
    Q, T = q_ids.shape[1], max(1, max(len(e.body) for e in episodes))
    body = torch.full((len(episodes), T), pad, dtype=torch.long, device=device)
    attn = torch.zeros(len(episodes), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(episodes), T, device=device)
    log_q = torch.zeros(len(episodes), T, device=device)
    token_scores = torch.zeros(len(episodes), T, device=device)
    for i, e in enumerate(episodes):
        n = len(e.body)
        body[i, :n] = torch.tensor(e.body, dtype=torch.long)
        attn[i, :n] = 1
        mask[i, :n] = torch.tensor(e.policy, dtype=torch.float)
        log_q[i, :n] = torch.tensor(e.log_q)
        for pos, r in e.rewards:
            token_scores[i, pos] += r
    input_ids, attention_mask = torch.cat([q_ids, body], 1), torch.cat([q_mask, attn], 1)
    with phase("behaviour"):  # (one pass over whole episodes: the turns' own passes saw only their prefixes)
        logprobs, values, _ = policy.token_logprobs(input_ids, attention_mask, Q, temperature, with_values=with_values)
    with phase("reference"):
        ref_logprobs = policy.reference_logprobs(input_ids, attention_mask, Q, temperature)
    with phase("scoring"):
        queries = [tok.decode(e.query, skip_special_tokens=True) for e in episodes]
        texts = [tok.decode(e.body, skip_special_tokens=True) for e in episodes]
        final = score(reward, queries, texts, device, columns_of(prompts))  # the reward source on the whole transcript
    for i, e in enumerate(episodes):
        last = max(k for k, m in enumerate(e.policy) if m)  # (every episode has a turn: at least one token)
        token_scores[i, last] += final[i]
    # token in, token out: the trained ids are the sampled ones; what re-rendering the text would have given
    trained = [[t for t, m in zip(e.body, e.policy) if m] for e in episodes]
    assert all(t == [x for turn in e.sampled for x in turn] for t, e in zip(trained, episodes)), "sampled ids lost"
    drift = sum(tok(tok.decode(e.query + e.body), add_special_tokens=False)["input_ids"] != e.query + e.body
                for e in episodes)
    n = len(episodes)
    stats = {EPISODE_TURNS: sum(e.turns for e in episodes) / n, EPISODE_TRUNCATED: sum(e.truncated for e in episodes) / n,
             EPISODE_TOOL_CALLS: sum(e.tool_calls for e in episodes) / n,
             EPISODE_TOOL_ERRORS: sum(e.tool_errors for e in episodes) / n, EPISODE_RETOKENIZE_DRIFT: drift / n,
             EPISODE_TURN_REWARD: sum(r for e in episodes for _, r in e.rewards) / max(1, sum(e.turns for e in episodes))}
    return Rollout(
        input_ids=input_ids, attention_mask=attention_mask, query_len=Q, mask=mask, logprobs=logprobs * mask,
        ref_logprobs=ref_logprobs * mask, values=None if values is None else values * mask,
        scores=token_scores.sum(1), queries=queries, responses=texts, columns={},
        proposal_logprobs=log_q * mask if off_policy else None, temperature=temperature, token_scores=token_scores,
        episode_stats=stats)
