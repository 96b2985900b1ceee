"""Rollout collection, shared by every on-policy optimizer.

generate (left-padded queries, KV cache) -> response mask (up to and including the first
EOS) -> one no-grad forward of the policy (log-probs, values) and one of the reference ->
decoded text -> reward source's scores.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf import numerics
from rlhf.interfaces import RewardSource, Rollout
from rlhf.policy import Policy


def pad_left(queries: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(q) for q in queries)
    ids = torch.full((len(queries), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(queries), width), dtype=torch.long)
    for i, q in enumerate(queries):
        ids[i, width - len(q) :] = torch.tensor(q, dtype=torch.long)
        mask[i, width - len(q) :] = 1
    return ids.to(device), mask.to(device)


def response_mask(responses: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS, 0 after it. (B, T) -> (B, T) long.

    Works whether the pad token is EOS (GPT-2) or a token of its own.
    """
    if eos_id is None:
        return torch.ones_like(responses)
    is_eos = (responses == eos_id).long()
    before_or_at_first_eos = (is_eos.cumsum(1) - is_eos) == 0
    return before_or_at_first_eos.long()


@torch.no_grad()
def generate(policy: Policy, queries: Sequence[list[int]], gen_kwargs: dict[str, Any]):
    """Sample responses. Returns (input_ids (B, Q+T), attention_mask, Q, response mask (B, T))."""
    tok = policy.tokenizer
    ids, qmask = pad_left(queries, tok.pad_token_id, policy.device)
    was_training = policy.model.training
    policy.model.eval()
    out = policy.model.generate(
        input_ids=ids, attention_mask=qmask, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, **gen_kwargs,
    )
    policy.model.train(was_training)
    q = ids.shape[1]
    responses = out[:, q:]
    rmask = response_mask(responses, tok.eos_token_id)
    width = int(rmask.sum(1).max())  # drop columns that are padding in every row
    out, rmask = out[:, : q + width], rmask[:, :width]
    return out, torch.cat([qmask, rmask], dim=1), q, rmask


@torch.no_grad()
def decode(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, q: int) -> tuple[list[str], list[str]]:
    tok = policy.tokenizer
    queries = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(input_ids[:, :q], attention_mask[:, :q])]
    responses = [tok.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(input_ids[:, q:], attention_mask[:, q:])]
    return queries, responses


@torch.no_grad()
def score(reward: RewardSource, queries: list[str], responses: list[str], device: torch.device) -> torch.Tensor:
    scores = torch.as_tensor(reward.score(queries, responses), dtype=torch.float32).flatten()
    if scores.shape[0] != len(responses):
        raise ValueError(
            f"reward source {type(reward).__name__} returned {scores.shape[0]} scores for "
            f"{len(responses)} responses; score() must return one float per response"
        )
    return scores.to(device)


@torch.no_grad()
def collect(
    policy: Policy, reward: RewardSource, queries: Sequence[list[int]], gen_kwargs: dict[str, Any], temperature: float
) -> Rollout:
    input_ids, attention_mask, q, mask = generate(policy, queries, gen_kwargs)
    logits, values = policy.forward(input_ids, attention_mask, q)
    responses_ids = input_ids[:, q:]
    logprobs = numerics.logprobs_of(logits, responses_ids, temperature)
    ref_logprobs = numerics.logprobs_of(policy.reference_logits(input_ids, attention_mask, q), responses_ids, temperature)
    query_text, response_text = decode(policy, input_ids, attention_mask, q)
    scores = score(reward, query_text, response_text, policy.device)
    maskf = mask.float()
    return Rollout(
        input_ids=input_ids, attention_mask=attention_mask, query_len=q, mask=maskf,
        logprobs=logprobs * maskf, ref_logprobs=ref_logprobs * maskf,
        values=None if values is None else values * maskf, scores=scores,
        queries=query_text, responses=response_text,
    )
