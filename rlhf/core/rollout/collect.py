"""Rollout collection, shared by every on-policy optimizer: a batch's queries drawn (by the
policy's own sampling loop, `sampling`, or a proposal), then log pi of the current policy,
the reference's log-probs, the decoded text and the reward source's scores; and the
minibatches the update loop cuts from a batch.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any, Sequence

import torch

from rlhf.contracts.interfaces import RewardSource, Rollout, Sampling
from rlhf.core.loop.phases import phase
from rlhf.core.model.policy import Policy
from rlhf.core.rollout.data import RenderedText, special_ids
from rlhf.core.rollout.sampling import generate


@torch.no_grad()
def decode(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, q: int) -> tuple[list[str], list[str]]:
    """The text of each row's query and response (the tokens its mask keeps). A response
    leaves special tokens out; a query rendered by the chat template keeps them (a
    `RenderedText`), so that query + response reads as the template writes the conversation."""
    tok = policy.tokenizer
    specials = special_ids(tok)
    # as Python lists first: indexing a tensor row by row costs more than the decoding (3x, measured)
    rows, masks = input_ids.tolist(), attention_mask.tolist()
    def kept(ids, keep):
        return [t for t, k in zip(ids, keep) if k]
    queries = []
    for r, m in zip(rows, masks):
        ids = kept(r[:q], m[:q])
        rendered = any(t in specials for t in ids)
        text = tok.decode(ids, skip_special_tokens=not rendered)
        queries.append(RenderedText(text) if rendered else text)
    responses = [tok.decode(kept(r[q:], m[q:]), skip_special_tokens=True) for r, m in zip(rows, masks)]
    return queries, responses


def columns_of(queries: Sequence[list[int]]) -> dict[str, list]:
    """The prompts' other data fields as columns, one value per row (None where a row lacks one)."""
    rows = [getattr(q, "fields", None) or {} for q in queries]
    names = sorted({k for row in rows for k in row})
    return {k: [row.get(k) for row in rows] for k in names}


@torch.no_grad()
def score(reward: RewardSource, queries: list[str], responses: list[str], device: torch.device,
          columns: dict[str, list] | None = None) -> torch.Tensor:
    """The reward source's scores, checked: one float per response. The data's columns go to a
    source whose score() takes them (by name, or **columns). Whatever random numbers the source
    draws, torch's generator is where it was: the samples never depend on who scores them."""
    taken = _columns_taken(type(reward))
    given = {k: v for k, v in (columns or {}).items() if taken is True or k in taken}
    # apart from torch's random numbers: a source that draws any (building its model on first use
    # does) would otherwise change the samples drawn after it, and evaluations with a judge or
    # another reward source would not sample what evaluations without them sample
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        given_scores = reward.score(queries, responses, **given)
    scores = torch.as_tensor(given_scores, dtype=torch.float32).flatten()
    if scores.shape[0] != len(responses):
        raise ValueError(
            f"reward source {type(reward).__name__} returned {scores.shape[0]} scores for "
            f"{len(responses)} responses; score() must return one float per response"
        )
    return scores.to(device)


@torch.no_grad()
def collect(
    policy: Policy, reward: RewardSource, queries: Sequence[list[int]], gen_kwargs: dict[str, Any], temperature: float,
    with_values: bool = True, rows: tuple[int, int] | None = None, proposal: Any = None, training: bool = True,
) -> Rollout:
    """Sample (from `proposal`, default the policy itself), then log pi of the current policy,
    log pi_ref, the decoded texts and the reward source's scores. `training=False` (an
    evaluation): the proposal's bypass is neither asked nor measured, so its schedule is the
    training batches' alone."""
    with phase("sampling"):
        if proposal is None or proposal.is_policy:
            g = generate(policy, queries, gen_kwargs, temperature, with_values, rows)
        else:
            g = proposal.sample(policy, queries, Sampling(temperature, gen_kwargs), with_values, rows)
    input_ids, attention_mask, q = g.input_ids, g.attention_mask, g.query_len
    logprobs, values = g.logprobs, g.values
    # Under bf16 autocast the cached sampling pass and a full forward round differently (by
    # ~1e-2 nats a token), so PPO's ratio would not start at 1 and the KL not at 0: recompute
    # on the path that the reference and the update use. In fp32 they agree to ~1e-6. Drawn by
    # another proposal, log pi is the current policy's, from a pass of its own.
    low_precision = torch.is_autocast_enabled(policy.device.type)
    off_policy = proposal is not None and not proposal.is_policy
    needs_values = with_values and policy.value_head is not None
    # bypass: an engine whose log q is the policy's (measured on its first batch) stands for the pass
    bypass = off_policy and training and not needs_values and getattr(proposal, "stands_for_policy", lambda: False)()
    if bypass:
        logprobs = g.sampled_logprobs
    elif low_precision or off_policy or logprobs is None or (needs_values and values is None):
        with phase("behaviour"):
            logprobs, values, _ = policy.token_logprobs(input_ids, attention_mask, q, temperature, with_values=with_values)
        if off_policy and training and hasattr(proposal, "observe_gap") and not low_precision:
            proposal.observe_gap(float(((g.sampled_logprobs - logprobs) * g.mask).abs().max()))
    with phase("reference"):
        ref_logprobs = policy.reference_logprobs(input_ids, attention_mask, q, temperature)
    with phase("scoring"):
        query_text, response_text = decode(policy, input_ids, attention_mask, q)
        columns = columns_of(queries)
        scores = score(reward, query_text, response_text, policy.device, columns)
    maskf = g.mask.float()
    return Rollout(
        input_ids=input_ids, attention_mask=attention_mask, query_len=q, mask=maskf,
        logprobs=logprobs * maskf, ref_logprobs=ref_logprobs * maskf,
        values=None if values is None else values * maskf, scores=scores,
        queries=query_text, responses=response_text, columns=columns,
        proposal_logprobs=g.sampled_logprobs * maskf if off_policy else None, temperature=temperature,
    )


def _columns_taken(cls: type) -> bool | set[str]:
    """True if cls.score takes **columns, else the keyword parameters it names."""
    import inspect

    params = list(inspect.signature(cls.score).parameters.values())[3:]  # after self, queries, responses
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    return {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def minibatch_indices(B: int, n: int, device: torch.device) -> list[torch.Tensor]:
    """A shuffled split of rows 0..B-1 into n minibatches (of sizes differing by at most one
    when n does not divide B, which is said once)."""
    if B % n:
        sizes = sorted({B // n + 1, B // n} if B >= n else {1}, reverse=True)
        warnings.warn(f"{B} rows do not split evenly into {min(n, B)} minibatches (num_minibatches={n}): minibatches of "
                      f"{' and '.join(map(str, sizes))} rows; make the batch a multiple of num_minibatches for equal ones",
                      stacklevel=2)
    return list(torch.randperm(B, device=device).tensor_split(min(n, B)))


def minibatch(r: Rollout, idx: torch.Tensor, **per_row: torch.Tensor) -> tuple[Rollout, dict[str, torch.Tensor]]:
    """Rows `idx` of a rollout, and of other (B, T) or (B,) tensors, without the columns that
    are padding in every one of those rows: the query padding on the left, the response
    padding on the right. Position ids and causal attention make this exact, and a minibatch
    of short responses costs what short responses cost."""
    attn, mask = r.attention_mask[idx], r.mask[idx]
    q_start = int((attn[:, : r.query_len].sum(0) > 0).long().argmax())  # first query column someone uses
    # the last column any of these rows uses (an episode's mask has the environment's tokens between turns)
    used = (mask > 0).any(0).nonzero()
    T = max(1, int(used[-1]) + 1) if len(used) else 1
    cols = slice(q_start, r.query_len + T)
    rows = idx.tolist()
    sub = replace(
        r, input_ids=r.input_ids[idx, cols], attention_mask=attn[:, cols], query_len=r.query_len - q_start,
        mask=mask[:, :T], logprobs=r.logprobs[idx, :T], ref_logprobs=r.ref_logprobs[idx, :T],
        values=None if r.values is None else r.values[idx, :T], scores=r.scores[idx],
        proposal_logprobs=None if r.proposal_logprobs is None else r.proposal_logprobs[idx, :T],
        is_weight=None if r.is_weight is None else r.is_weight[idx, :T], log_ratio=r.log_ratio[idx, :T],
        token_scores=None if r.token_scores is None else r.token_scores[idx, :T],
        queries=[r.queries[i] for i in rows], responses=[r.responses[i] for i in rows],
        columns={k: [v[i] for i in rows] for k, v in r.columns.items()},
    )
    return sub, {k: v[idx, :T] if v.dim() == 2 else v[idx] for k, v in per_row.items()}
