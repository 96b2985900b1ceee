"""`rollouts`: on-policy batches for PPO, A2C, REINFORCE, RLOO and GRPO."""

from __future__ import annotations

import random
from typing import Any

import torch

from rlhf.contracts.interfaces import ROLLOUTS, QuerySampler, RewardSource, Rollout, Sampling
from rlhf.contracts.metrics import TRAIN_KL, TRAIN_RESPONSE_LEN, TRAIN_REWARD, TRAIN_REWARD_MAX
from rlhf.core.model.policy import Policy
from rlhf.core.parallel import distributed
from rlhf.core.rollout import collect, episodes
from rlhf.core.rollout.data import Shuffled, sample_queries
from rlhf.core.rollout.sources import SourceContext, nonfinite_scores, source
from rlhf.core.toolkit import numerics


@source(ROLLOUTS)
class Rollouts:
    """Queries cut from shuffled prompts, k samples each (side by side), collected."""

    def __init__(self, policy: Policy, reward: RewardSource, sampler: QuerySampler, prompts: list[list[int]],
                 k: int, seed: int, proposal: Any = None, sampling: Sampling | None = None, env: Any = None):
        self.policy, self.reward, self.sampler, self.prompts, self.k = policy, reward, sampler, prompts, k
        self.sampling = sampling or Sampling(sampler.temperature, sampler.generation_kwargs())
        self.env = env  # episodes: played in it (rlhf.core.rollout.episodes)
        self.proposal = proposal  # what draws the responses (None: the policy)
        self.rng, self.order = random.Random(seed), Shuffled(len(prompts), random.Random(seed + 1))

    @classmethod
    def from_context(cls, ctx: SourceContext) -> Rollouts:
        # RLOO and GRPO compare k samples of a prompt
        return cls(ctx.policy, ctx.reward, ctx.sampler, ctx.prompts, ctx.optimizer.samples_per_prompt, ctx.seed, ctx.proposal,
                   ctx.how(), ctx.env)

    def next(self, batch_size: int) -> Rollout:
        # the whole batch's queries, the same on every rank; this rank samples its share of them
        prompts = [self.prompts[i] for i in self.order.take(batch_size)]
        # (an episode takes its prompt whole: the environment's task; a single turn the sampler's cut of it)
        queries = prompts if self.env is not None else sample_queries(self.sampler, prompts, self.rng)
        start, stop = distributed.shard(len(queries))
        mine = [q for q in queries[start:stop] for _ in range(self.k)]  # each prompt's k samples side by side
        if self.env is not None:  # an episode for each: turns of the policy and the environment's answers
            return episodes.play(self.policy, self.reward, self.env, mine, self.sampling,
                                 rows=(start * self.k, len(queries) * self.k), proposal=self.proposal)
        return collect.collect(self.policy, self.reward, mine, self.sampling.generation_kwargs(), self.sampling.temperature,
                               rows=(start * self.k, len(queries) * self.k), proposal=self.proposal)

    def head_metrics(self, batch: Rollout) -> dict[str, float]:
        seq_kl = batch.log_ratio.sum(1)  # (the k1 estimate)
        metrics = {
            TRAIN_REWARD: batch.scores.mean().item(),
            TRAIN_REWARD_MAX: batch.scores.max().item(),  # what the best sample found (the exploration finding)
            TRAIN_KL: seq_kl.mean().item(),
            TRAIN_RESPONSE_LEN: batch.mask.sum(1).mean().item(),
        }
        if batch.proposal_logprobs is not None:  # drawn by another distribution q: how far it is from pi
            metrics.update(numerics.mismatch(batch.logprobs, batch.proposal_logprobs, batch.mask))
        metrics.update(batch.episode_stats)
        return metrics

    def problem(self, batch: Rollout) -> str:
        scores = nonfinite_scores(batch.scores, batch.responses)
        if scores:
            return scores
        kl = batch.log_ratio * batch.mask
        if not torch.isfinite(kl).all():
            i = int((~torch.isfinite(kl).all(1)).nonzero()[0])
            return f"log pi - log pi_ref is not finite in row {i}: the policy or the reference gives a token probability 0 or NaN"
        return ""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "order": self.order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.order.load_state_dict(state["order"])
