"""The core's sampling loop: left-padded queries, a KV cache, log-probs (and values) read off
the sampling logits, the response mask up to and including the first end token. Exact log q
of every drawn token under temperature, top-k, top-p and uniform mixing.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf.contracts.interfaces import Generation
from rlhf.core.model.logprobs import position_ids
from rlhf.core.model.policy import Policy


def pad_left(queries: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(q) for q in queries)
    ids = torch.tensor([[pad_id] * (width - len(q)) + list(q) for q in queries], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in queries], dtype=torch.long)
    return ids.to(device), mask.to(device)


def response_mask(responses: torch.Tensor, eos_ids: int | Sequence[int] | None) -> torch.Tensor:
    """1 on response tokens up to and including the first end token (any of `eos_ids`), 0
    after it. (B, T) -> (B, T) long.

    Works whether the pad token is an end token (GPT-2) or a token of its own.
    """
    ends = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    if not ends:
        return torch.ones_like(responses)
    is_eos = torch.isin(responses, torch.tensor(ends, device=responses.device)).long()
    before_or_at_first_eos = (is_eos.cumsum(1) - is_eos) == 0
    return before_or_at_first_eos.long()


# generation settings the core's sampling loop implements; any other setting (beams, a
# repetition penalty, min_new_tokens, a key of a user's sampler) goes to transformers' generate
SAMPLING_LOOP_KEYS = {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "num_beams",
                      "repetition_penalty", "min_new_tokens", "mix_uniform"}


def sampling_loop_handles(gen_kwargs: dict[str, Any]) -> bool:
    return (set(gen_kwargs) <= SAMPLING_LOOP_KEYS and gen_kwargs.get("num_beams", 1) == 1
            and gen_kwargs.get("repetition_penalty", 1.0) == 1.0 and not gen_kwargs.get("min_new_tokens"))


@torch.no_grad()
def generate(
    policy: Policy, queries: Sequence[list[int]], gen_kwargs: dict[str, Any],
    temperature: float | None = None, with_values: bool = False, rows: tuple[int, int] | None = None,
    exact_q: bool = False,
) -> Generation:
    """Sample a response to each query (left-padded, KV cache, one batch).

    Plain sampling (temperature, top-k, top-p, greedy) runs the core's loop, which also
    returns log pi at `temperature` (and the value head's values) from the very logits it
    sampled from, so no second forward pass of the policy is needed. Other settings go to
    transformers' `generate`.

    The loop's random numbers come from a generator seeded by one draw of torch's, one
    uniform per row of the whole batch and token: `rows=(offset, total)` says these queries
    are rows offset.. of a batch of `total` (a data-parallel rank's share), and they then
    get exactly the samples those rows get when one process samples the whole batch.
    `exact_q`: also the log-probability of each token under the distribution that drew it
    (`sampled_logprobs`), what a proposal's importance weights need.
    """
    tok = policy.tokenizer
    ids, qmask = pad_left(queries, tok.pad_token_id, policy.device)
    limit, new = policy.context_length, gen_kwargs.get("max_new_tokens", 20)
    if limit is not None and ids.shape[1] + new > limit:
        raise ValueError(
            f"a query of {ids.shape[1]} tokens plus sampler.max_new_tokens={new} is more than the model's context of "
            f"{limit} positions; lower sampler.max_new_tokens or the query length (sampler.max_query_tokens)"
        )
    was_training = policy.model.training
    policy.model.eval()
    offset, total = rows or (0, len(queries))
    seed = int(torch.randint(2**62, (1,)))  # the one draw from torch's generator, whatever the length
    try:
        with policy.sampling():  # sharded: the whole model gathered for the loop
            if sampling_loop_handles(gen_kwargs):
                g = torch.Generator(ids.device).manual_seed(seed)
                out, logprobs, values, sampled = _sampling_loop(policy, ids, qmask, gen_kwargs,
                                                                temperature or gen_kwargs.get("temperature", 1.0),
                                                                with_values and policy.value_head is not None, g, offset,
                                                                total, exact_q)
            else:  # transformers draws from torch's generator: seeded per batch (and per rank's share)
                if exact_q:
                    raise ValueError(f"importance weights need the exact log-probabilities of the sampling distribution, "
                                     f"which transformers' generate does not give for these settings ({sorted(gen_kwargs)}); "
                                     "sample with temperature, top-k, top-p or greedy only")
                with torch.random.fork_rng(devices=[ids.device] if ids.device.type == "cuda" else []):
                    torch.manual_seed(seed + offset)
                    out = policy.model.generate(input_ids=ids, attention_mask=qmask, pad_token_id=tok.pad_token_id,
                                                eos_token_id=policy.eos_ids or None, **gen_kwargs)
                logprobs = values = sampled = None
    finally:
        policy.model.train(was_training)
    q = ids.shape[1]
    rmask = response_mask(out[:, q:], policy.eos_ids)
    width = int(rmask.sum(1).max())  # drop columns that are padding in every row
    out, rmask = out[:, : q + width], rmask[:, :width]
    def trim(x):
        return None if x is None else x[:, :width] * rmask
    return Generation(out, torch.cat([qmask, rmask], 1), q, rmask, trim(logprobs), trim(values), trim(sampled))


def _sampling_loop(policy: Policy, ids: torch.Tensor, qmask: torch.Tensor, gen: dict[str, Any], temperature: float,
                   with_values: bool, g: torch.Generator, offset: int, total: int,
                   exact_q: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Ancestral sampling with a KV cache. Returns (ids (B, Q+T), log-probs at `temperature` (B, T),
    values (B, T) or None, with `exact_q` the log-probs under the sampling distribution (B, T) or None)."""
    model, pad = policy.model, policy.tokenizer.pad_token_id
    ends = torch.tensor(policy.eos_ids, dtype=torch.long, device=ids.device)
    keep_last = {"logits_to_keep": 1} if policy.keeps_logits else {}
    cache_name = policy.cache_argument
    attn, x = qmask, ids
    pos = position_ids(qmask)
    cache = None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, logps, values, sampled = [], [], [], []
    for _ in range(gen.get("max_new_tokens", 20)):
        out = model(input_ids=x, attention_mask=attn, position_ids=pos, use_cache=True, output_hidden_states=with_values,
                    **{cache_name: cache}, **keep_last)
        cache = out[cache_name]
        logits = out.logits[:, -1].float()  # (B, V)
        u = torch.rand(total, 1, dtype=torch.float64, device=ids.device, generator=g)[offset : offset + ids.shape[0]]
        y = _draw(logits, gen, u)  # (B,)
        y = torch.where(finished, torch.full_like(y, pad), y)  # after EOS: padding, as generate does
        tokens.append(y)
        logps.append(torch.log_softmax(logits / temperature, -1).gather(-1, y[:, None]).squeeze(-1))
        if exact_q:
            sampled.append(sampling_log_probs(logits, gen).gather(-1, y[:, None]).squeeze(-1))
        if with_values:
            hidden = out.hidden_states[-1][:, -1]
            values.append(policy.value_head(hidden.to(policy.value_head.weight.dtype)).squeeze(-1))
        if len(ends):
            finished |= torch.isin(y, ends)
            if bool(finished.all()):
                break
        x, pos = y[:, None], pos[:, -1:] + 1
        attn = torch.cat([attn, torch.ones_like(x)], 1)
    return (torch.cat([ids, torch.stack(tokens, 1)], 1), torch.stack(logps, 1),
            torch.stack(values, 1) if with_values else None, torch.stack(sampled, 1) if exact_q else None)


def sampling_logits(logits: torch.Tensor, gen: dict[str, Any]) -> torch.Tensor:
    """The logits the sampler draws from: divided by the temperature, then top-k, then top-p
    (the order transformers applies them in), dropped tokens at -inf; greedy keeps only the
    argmax. (B, V) -> (B, V)"""
    if not gen.get("do_sample", True):
        return torch.full_like(logits, float("-inf")).scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
    logits = logits / gen.get("temperature", 1.0)
    top_k, top_p = gen.get("top_k") or 0, gen.get("top_p", 1.0)
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, -1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens entirely beyond the nucleus; the top one always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sampling_log_probs(logits: torch.Tensor, gen: dict[str, Any]) -> torch.Tensor:
    """log of the distribution the sampler draws the next token from (-inf where it never does):
    with `mix_uniform` = eps, (1 - eps) of the filtered softmax and eps spread over every token. (B, V)"""
    mix = gen.get("mix_uniform") or 0.0
    if not mix:
        return torch.log_softmax(sampling_logits(logits, gen), -1)
    return sampling_probs(logits, gen).log()


def sampling_probs(logits: torch.Tensor, gen: dict[str, Any]) -> torch.Tensor:
    """The distribution the sampler draws the next token from (see sampling_log_probs). (B, V)"""
    probs = sampling_logits(logits, gen).softmax(-1)
    mix = gen.get("mix_uniform") or 0.0
    return probs if not mix else (1 - mix) * probs + mix / probs.shape[-1]


def _draw(logits: torch.Tensor, gen: dict[str, Any], u: torch.Tensor) -> torch.Tensor:
    """One token per row from the sampler's distribution (sampling_logits), given one uniform
    per row (B, 1); greedy if do_sample is false. (B, V) -> (B,)"""
    if not gen.get("do_sample", True):
        return logits.argmax(-1)
    # inverse-CDF sampling: one uniform per row, the first token whose cumulative probability
    # exceeds it. Exact (float64 sums), and on the CPU 5-20x faster than torch.multinomial,
    # which transformers' generate calls once per token (0.8 ms at vocabulary 1k, 38 ms at 50k
    # for 32 rows, measured here)
    cdf = sampling_probs(logits, gen).double().cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
