"""`preference_pairs`: offline DPO's batches, fixed pairs from the data in shuffled passes."""

from __future__ import annotations

import math
import random

import torch

from rlhf.contracts.interfaces import PREFERENCE_PAIRS, PairBatch, RewardSource
from rlhf.core.model.policy import Policy
from rlhf.core.parallel import distributed
from rlhf.core.rollout.data import MAX_PROMPT_TOKENS, Shuffled, encode_prompt, response_ids
from rlhf.core.rollout.pairs import Pair, load_pairs, pair_batch, reference_logps
from rlhf.core.rollout.sources import SourceContext, source


@source(PREFERENCE_PAIRS)
class OfflinePairs:
    """Shuffled passes over a fixed pair set; each pair's reference log-probs computed once."""

    def __init__(self, policy: Policy, pairs: list[Pair], prompts, chosen, rejected, seed: int, preference=None):
        self.policy, self.pairs = policy, pairs
        self.prompts, self.chosen, self.rejected = prompts, chosen, rejected  # token lists per pair
        self.preference = preference  # P(chosen preferred) per pair, or None for hard labels
        self.ref_cache: dict[int, tuple[float, float]] = {}
        self.order = Shuffled(len(pairs), random.Random(seed))

    @classmethod
    def from_context(cls, ctx: SourceContext) -> OfflinePairs:
        """The data's pairs (data.pairs), or Bradley-Terry-labelled pairs of whole responses for toy problems."""
        if ctx.data.pairs == "bradley_terry":
            if getattr(ctx.optimizer.cfg, "label_smoothing", 0):  # (a soft label is the probability itself)
                raise ValueError(f"not in force: optimizer.label_smoothing={ctx.optimizer.cfg.label_smoothing} with "
                                 "data.pairs=bradley_terry, whose pairs carry their own preference probabilities; leave "
                                 "it at 0 or train on labelled pairs")
            return bradley_terry_pairs(ctx.policy, ctx.reward, ctx.prompts, ctx.data.n_train, ctx.seed,
                                       ctx.sampler.generation_kwargs().get("max_new_tokens", 1))
        pairs, _ = load_pairs(ctx.data)
        return cls.from_text(ctx.policy, pairs, MAX_PROMPT_TOKENS, ctx.seed, where=ctx.data.pairs)

    @classmethod
    def from_text(cls, policy: Policy, pairs: list[Pair], max_prompt_tokens: int, seed: int,
                  where: str = "preference pairs") -> OfflinePairs:
        tok, ends = policy.tokenizer, policy.eos_ids
        # text prompts cut to max_prompt_tokens, conversations rendered whole; each response ends
        # with the token the policy stops on (EOS, or the template's end of turn): it learns to stop
        given = [p.prompt if isinstance(p.prompt, str) else list(p.prompt) for p in pairs]
        prompts = [encode_prompt(tok, x, max_prompt_tokens) for x in given]
        chosen = [response_ids(tok, x, p.chosen, ends) for x, p in zip(given, pairs)]
        rejected = [response_ids(tok, x, p.rejected, ends) for x, p in zip(given, pairs)]
        limit = policy.context_length
        for i, (pair, p, c, r) in enumerate(zip(pairs, prompts, chosen, rejected)):
            row = f"{where}: row {pair.row if pair.row >= 0 else i}"
            if not p:
                raise ValueError(f"{row} has an empty prompt; the first response token needs a context")
            if limit is not None and len(p) + max(len(c), len(r)) > limit:
                raise ValueError(
                    f"{row} is {len(p) + max(len(c), len(r))} tokens (prompt + the longer response), more than the "
                    f"model's context of {limit}; shorten or drop it"
                )
        return cls(policy, pairs, prompts, chosen, rejected, seed)

    def state_dict(self) -> dict:
        """The data position and the cached reference log-probs (recomputing them in other
        batches could differ in the last bit), every data-parallel rank's."""
        cache = {k: v for part in distributed.gather_objects(self.ref_cache) for k, v in part.items()}
        return {"order": self.order.state_dict(), "ref_cache": {str(k): list(v) for k, v in cache.items()},
                "pairs_sha256": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """The data position and the cached reference log-probs, when they are of these pairs (a
        resume forced to other data computes them again)."""
        self.order.load_state_dict(state["order"])
        if state.get("pairs_sha256", self.fingerprint()) == self.fingerprint():
            self.ref_cache = {int(k): tuple(v) for k, v in state.get("ref_cache", {}).items()}

    def fingerprint(self) -> str:
        """What the cached reference log-probs are of: every pair's tokens."""
        import hashlib

        return hashlib.sha256(repr((self.prompts, self.chosen, self.rejected)).encode()).hexdigest()

    def head_metrics(self, batch: PairBatch) -> dict[str, float]:
        return {}  # fixed data: nothing about the batch itself changes as the policy trains

    def problem(self, batch: PairBatch) -> str:
        return ""  # no scores: the reference log-probs are the only numbers, and the loss guards them

    def next(self, batch_size: int) -> PairBatch:
        idx = self.order.take(batch_size)  # the whole batch, the same on every rank
        start, stop = distributed.shard(len(idx))
        idx = idx[start:stop]  # this rank's pairs
        ids, attn, q, mask = pair_batch(
            self.policy, [self.prompts[i] for i in idx], [self.chosen[i] for i in idx], [self.rejected[i] for i in idx]
        )
        B = len(idx)
        missing = [j for j, i in enumerate(idx) if i not in self.ref_cache]
        run = bool(missing)  # only the pairs never seen before go through the reference
        if self.policy.sharded:  # every pass is collective: when any rank needs one, all make it
            run = distributed.any_rank(run, ids.device)
        if run:
            todo = missing or [0]  # (a rank with nothing to compute passes its first pair, and drops it)
            rows = torch.tensor(todo + [j + B for j in todo], device=ids.device)
            ref = reference_logps(self.policy, ids[rows], attn[rows], q, mask[rows].float()).tolist()
            for k, j in enumerate(missing):
                self.ref_cache[idx[j]] = (ref[k], ref[k + len(missing)])
        ref_logps = torch.tensor(
            [self.ref_cache[i][0] for i in idx] + [self.ref_cache[i][1] for i in idx], device=ids.device
        )
        pairs = [self.pairs[i] for i in idx]
        return PairBatch(
            input_ids=ids, attention_mask=attn, query_len=q, mask=mask.float(), ref_logps=ref_logps,
            queries=[p.prompt for p in pairs], chosen=[p.chosen for p in pairs], rejected=[p.rejected for p in pairs],
            preference=None if self.preference is None else torch.tensor([self.preference[i] for i in idx], device=ids.device),
        )


@torch.no_grad()
def bradley_terry_pairs(
    policy: Policy, reward: RewardSource, prompts: list[list[int]], n: int, seed: int, max_new_tokens: int = 1,
) -> OfflinePairs:
    """For toy problems small enough to enumerate: n pairs of two distinct responses (any
    response the sampler can produce, up to max_new_tokens and ending at EOS or cut at the
    cap) drawn uniformly, labelled by the Bradley-Terry model of the reward,
    P(y1 preferred) = sigma(r(x, y1) - r(x, y2)), as a soft label: the DPO loss then takes
    the expectation over the label instead of one coin flip per pair, and its minimiser is
    exactly the optimum pi*."""
    from rlhf.core.evaluation.optimum import all_responses, check_enumerable

    tok = policy.tokenizer
    vocab = policy.vocab_size
    check_enumerable(vocab, {"max_new_tokens": max_new_tokens}, tok.eos_token_id is not None)
    responses = all_responses(vocab, max_new_tokens, tok.eos_token_id)
    rng = random.Random(seed)
    def text(ids):
        return tok.decode(list(ids), skip_special_tokens=True)
    rows, q_ids, c_ids, r_ids, preference = [], [], [], [], []
    for i in range(n):
        x = prompts[i % len(prompts)]
        y1, y2 = (responses[j] for j in rng.sample(range(len(responses)), 2))
        r1, r2 = reward.score([text(x)] * 2, [text(y1), text(y2)]).tolist()
        rows.append(Pair(text(x), text(y1), text(y2)))
        q_ids.append(list(x)), c_ids.append(list(y1)), r_ids.append(list(y2))
        preference.append(1 / (1 + math.exp(-(r1 - r2))))
    return OfflinePairs(policy, rows, q_ids, c_ids, r_ids, seed, preference)
