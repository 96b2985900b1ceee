"""`sampled_pairs`: online DPO's batches, two samples per prompt from the current policy,
the one the reward source scores higher chosen (ties go to the first)."""

from __future__ import annotations

import random

import torch

from rlhf.contracts.interfaces import SAMPLED_PAIRS, PairBatch, RewardSource
from rlhf.contracts.metrics import TRAIN_REWARD
from rlhf.core.model.policy import Policy
from rlhf.core.parallel import distributed
from rlhf.core.rollout import collect, sampling
from rlhf.core.rollout.data import Shuffled, sample_queries
from rlhf.core.rollout.pairs import reference_logps
from rlhf.core.rollout.sources import SourceContext, nonfinite_scores, source


@source(SAMPLED_PAIRS)
class OnlinePairs:
    """Two samples per prompt from the current policy; the reward source picks the chosen one."""

    def __init__(self, policy: Policy, reward: RewardSource, prompts: list[list[int]], sampler, seed: int):
        self.policy, self.reward, self.prompts, self.sampler = policy, reward, prompts, sampler
        self.rng = random.Random(seed)
        self.order = Shuffled(len(prompts), self.rng)

    @classmethod
    def from_context(cls, ctx: SourceContext) -> OnlinePairs:
        return cls(ctx.policy, ctx.reward, ctx.prompts, ctx.sampler, ctx.seed)

    def head_metrics(self, batch: PairBatch) -> dict[str, float]:
        return {TRAIN_REWARD: batch.scores.mean().item()}  # what the reward source thought of them

    def problem(self, batch: PairBatch) -> str:
        return nonfinite_scores(batch.scores, batch.chosen + batch.rejected)

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict()}  # its rng is the sampler's too

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])

    def next(self, batch_size: int) -> PairBatch:
        idx = self.order.take(batch_size)
        queries = sample_queries(self.sampler, [self.prompts[i] for i in idx], self.rng)  # the whole batch, on every rank
        start, stop = distributed.shard(len(queries))
        queries = queries[start:stop]
        n = 2 * len(queries)  # this rank's share of the random numbers: its own samples
        g = sampling.generate(self.policy, queries * 2, self.sampler.generation_kwargs(),
                             rows=(distributed.rank() * n, distributed.world() * n))
        ids, attn, q, mask = g.input_ids, g.attention_mask, g.query_len, g.mask
        texts_q, texts_r = collect.decode(self.policy, ids, attn, q)
        scores = collect.score(self.reward, texts_q, texts_r, self.policy.device, collect.columns_of(queries * 2))
        B = len(queries)
        first_wins = scores[:B] >= scores[B:]
        arange = torch.arange(B, device=ids.device)
        chosen = torch.where(first_wins, arange, arange + B)
        rows = torch.cat([chosen, torch.where(first_wins, arange + B, arange)])
        ids, attn, mask = ids[rows], attn[rows], mask[rows].float()
        return PairBatch(
            input_ids=ids, attention_mask=attn, query_len=q, mask=mask,
            ref_logps=reference_logps(self.policy, ids, attn, q, mask),
            queries=texts_q[:B], chosen=[texts_r[i] for i in rows[:B].tolist()],
            rejected=[texts_r[i] for i in rows[B:].tolist()], scores=scores[rows],
        )
