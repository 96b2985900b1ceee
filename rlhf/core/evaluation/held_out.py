"""Held-out evaluation: reward, KL to the reference, response length, distinct-2, samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rlhf.contracts.interfaces import RewardSource
from rlhf.contracts.metrics import (
    EVAL_ACCURACY,
    EVAL_DISTINCT_2,
    EVAL_FLUENCY,
    EVAL_KL,
    EVAL_REPETITION,
    EVAL_RESPONSE_LEN,
    EVAL_REWARD,
    EVAL_REWARD_STD,
)
from rlhf.core.model.policy import Policy
from rlhf.core.rollout import collect, sampling
from rlhf.core.run import rundir
from rlhf.core.toolkit import numerics


@torch.no_grad()
def evaluate(
    policy: Policy,
    reward: RewardSource,
    queries: Sequence[list[int]],
    gen_kwargs: dict[str, Any],
    temperature: float,
    seed: int,
    batch_size: int,
    judges: Mapping[str, RewardSource] | None = None,
    env: Any = None,
    proposal: Any = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics on the fixed held-out queries, sampled with a fixed seed so steps compare.

    `eval/kl` is the mean over prompts of sum_t (log pi - log pi_ref)(y_t), y ~ pi: a Monte
    Carlo estimate of the sequence-level KL(pi || pi_ref) at the sampling temperature.
    `eval/fluency` is the fluency judge: the responses' mean log-likelihood per token under
    the reference (at the sampling temperature), which word salad drives down however a
    reward or a sentiment judge scores it; `eval/repetition` the mean share of each
    response's word bigrams that repeat an earlier one of the same response. With an
    environment (`env`), each query's prompt is an episode's, played to its end: the reward
    is the episode's return, the KL and the length are over the policy's tokens, the
    episode's statistics (`episode/...`) come as `eval/episode/...`. A `proposal` (an engine
    whose samples are the policy's: vLLM in float32) draws the samples instead of the core's loop.
    `eval/judge/<name>` is the mean score of each extra judge on the same samples: a reward
    that rises while an independent judge does not is a sign of reward hacking.
    """
    judges = judges or {}
    scores, kls, lengths, rows, ref_ll = [], [], [], [], []
    judged: dict[str, list[torch.Tensor]] = {name: [] for name in judges}
    episodes: dict[str, list[float]] = {}
    with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(queries), batch_size):
            if env is None:
                batch = collect.collect(policy, reward, queries[i : i + batch_size], gen_kwargs, temperature,
                                        with_values=False, proposal=proposal, training=False)
            else:
                from rlhf.contracts.interfaces import Sampling
                from rlhf.core.rollout.episodes import play

                batch = play(policy, reward, env, queries[i : i + batch_size], Sampling(temperature, gen_kwargs), False,
                             proposal=proposal)
                for k, v in batch.episode_stats.items():
                    episodes.setdefault(f"eval/{k}", []).append(v)
            kl = batch.log_ratio.sum(1)  # (the k1 estimate)
            scores.append(batch.scores)
            kls.append(kl)
            lengths.append(batch.mask.sum(1))
            ref_ll.append((batch.ref_logprobs * batch.mask).sum(1) / batch.mask.sum(1).clamp(min=1))
            extra = {name: collect.score(j, batch.queries, batch.responses, policy.device, batch.columns)
                     for name, j in judges.items()}
            for name, values in extra.items():
                judged[name].append(values)
            rows += [
                dict(query=q, response=r, reward=float(s), kl=float(k), **{n: float(v[i]) for n, v in extra.items()})
                for i, (q, r, s, k) in enumerate(zip(batch.queries, batch.responses, batch.scores, kl))
            ]
    metrics = {
        EVAL_REWARD: torch.cat(scores).mean().item(),
        EVAL_REWARD_STD: torch.cat(scores).std().item(),
        EVAL_KL: torch.cat(kls).mean().item(),
        EVAL_RESPONSE_LEN: torch.cat(lengths).mean().item(),
        EVAL_DISTINCT_2: numerics.distinct_n([r["response"] for r in rows], 2),
        EVAL_FLUENCY: torch.cat(ref_ll).mean().item(),
        EVAL_REPETITION: sum(numerics.repetition(r["response"]) for r in rows) / max(1, len(rows)),
        **{f"eval/judge/{name}": torch.cat(values).mean().item() for name, values in judged.items()},
        **{f"eval/judge_std/{name}": torch.cat(values).std().item() for name, values in judged.items()},
        **{k: sum(v) / len(v) for k, v in episodes.items()},
    }
    return metrics, rows


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c pass (Chen et al. 2021, eq. 1):
    1 - C(n - c, k) / C(n, k), as a product so that large n stays exact in floating point."""
    if n - c < k:
        return 1.0
    miss = 1.0
    for j in range(n - c + 1, n + 1):
        miss *= 1.0 - k / j
    return 1.0 - miss


@torch.no_grad()
def pass_at_k(policy: Policy, judge: RewardSource, queries: Sequence[list[int]], gen_kwargs: dict[str, Any],
              seed: int, batch_size: int, n: int, ks: Sequence[int], threshold: float) -> dict[str, float]:
    """`eval/pass@k` for each k and `eval/accuracy` (the share of passing samples): n samples of
    each held-out query, a sample passing when the judge scores it >= threshold."""
    passed = []
    rows = [q for q in queries for _ in range(n)]  # a query's n samples side by side
    with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            g = sampling.generate(policy, chunk, gen_kwargs)
            texts_q, texts_r = collect.decode(policy, g.input_ids, g.attention_mask, g.query_len)
            passed += (collect.score(judge, texts_q, texts_r, policy.device, collect.columns_of(chunk)) >= threshold).tolist()
    counts = [sum(passed[j * n : (j + 1) * n]) for j in range(len(queries))]
    out = {f"eval/pass@{k}": sum(pass_at_k_estimate(n, c, k) for c in counts) / len(counts) for k in ks}
    out[EVAL_ACCURACY] = sum(counts) / (n * len(counts))
    return out


def save_samples(run_dir: Path, step: int, rows: list[dict[str, Any]], n: int) -> None:
    """The first n samples of an evaluation, as samples/step_<N>.jsonl (written atomically)."""
    text = "".join(rundir.to_json(row) + "\n" for row in rows[:n])
    rundir.write_atomic(run_dir / rundir.SAMPLES / f"step_{step:05d}.jsonl", text)
