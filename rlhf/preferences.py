"""Preference pairs (prompt, chosen, rejected): loading, batching, reference log-probs.

Offline pairs come from the embedded generator, a local JSON/JSONL/Parquet file, or a hub
dataset. Online pairs are two samples per prompt from the current policy, the reward
source picking the chosen one. Either way an optimizer receives a `PairBatch`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from rlhf import distributed, numerics, rollout
from rlhf.config import DataConfig
from rlhf.data import Shuffled
from rlhf.interfaces import PairBatch, RewardSource
from rlhf.policy import Policy

EMBEDDED_PAIRS_TRAIN_SEED, EMBEDDED_PAIRS_EVAL_SEED = 20_001, 20_002


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    row: int = field(default=-1, compare=False)  # its row in the file it came from, for error messages


# ------------------------------------------------------------------------ loading


def load_pairs(cfg: DataConfig) -> tuple[list[Pair], list[Pair]]:
    """(training pairs, held-out pairs)."""
    if cfg.pairs == "embedded":
        from rlhf.embedded.corpus import preference_pairs

        train = [Pair(*p) for p in preference_pairs(cfg.n_train, EMBEDDED_PAIRS_TRAIN_SEED)]
        held_out = [Pair(*p) for p in preference_pairs(cfg.n_eval, EMBEDDED_PAIRS_EVAL_SEED)]
        return train, held_out
    if Path(cfg.pairs).suffix in (".json", ".jsonl", ".parquet"):
        rows, where = _read_rows(Path(cfg.pairs)), cfg.pairs
    else:
        rows, where = _read_hub(cfg), f"hub dataset {cfg.pairs}"
    # rlhf-label's files also record ties and skips: they are answers, not preferences
    pairs = [_pair(row, i, cfg, where) for i, row in enumerate(rows)
             if not (isinstance(row, dict) and row.get("label") in ("tie", "skip"))]
    if len(pairs) <= cfg.n_eval:
        raise ValueError(f"{where}: {len(pairs)} pairs, need more than data.n_eval={cfg.n_eval}")
    return pairs[cfg.n_eval : cfg.n_eval + cfg.n_train], pairs[: cfg.n_eval]


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"data.pairs: no such file {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    rows = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from e
    return rows


def _read_hub(cfg: DataConfig) -> list[dict]:
    import datasets

    return list(datasets.load_dataset(cfg.pairs, split=cfg.split))


def _pair(row: dict, i: int, cfg: DataConfig, where: str) -> Pair:
    fields = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    values = [row.get(f) if isinstance(row, dict) else None for f in fields]
    for name, value in zip(fields, values):
        if not isinstance(value, str):
            raise ValueError(f"{where}: row {i} has no string field {name!r} (fields: data.*_field)")
    if not values[1].strip() or not values[2].strip():
        raise ValueError(f"{where}: row {i} has an empty chosen or rejected response")
    return Pair(*values, row=i)


# ------------------------------------------------------------------------ batching


def pair_batch(
    policy: Policy, queries: Sequence[list[int]], chosen: Sequence[list[int]], rejected: Sequence[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Token lists -> (input_ids (2B, L), attention_mask, Q, response mask (2B, L - Q)).

    Rows [0, B) are the chosen responses and [B, 2B) the rejected ones, each row its query
    followed directly by its response, right-padded: one forward pass scores both, and a
    batch is as wide as its longest query + response, not its longest query plus its
    longest response (16% fewer positions on the embedded pairs). Q is the shortest query,
    so every response token lies at or after column Q; `mask` marks them.
    """
    rows = [list(q) + list(r) for q, r in zip(list(queries) * 2, list(chosen) + list(rejected))]
    starts = [len(q) for q in list(queries) * 2]
    if min(starts) == 0:
        raise ValueError("preference pairs: a prompt is empty after tokenisation; the first response token needs a context")
    width, q = max(len(r) for r in rows), min(starts)
    ids = torch.full((len(rows), width), policy.tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attn[i, : len(row)] = 1
    mask = attn.clone()
    for i, start in enumerate(starts):
        mask[i, :start] = 0  # the query's own tokens are not scored
    return ids.to(policy.device), attn.to(policy.device), q, mask[:, q:].to(policy.device)


@torch.no_grad()
def reference_logps(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, q: int, mask: torch.Tensor) -> torch.Tensor:
    """Sum of reference log-probs over each row's response tokens. (2B,)"""
    logits = policy.reference_logits(input_ids, attention_mask, q)
    return (numerics.logprobs_of(logits, input_ids[:, q:]) * mask).sum(1)


class OfflinePairs:
    """Shuffled passes over a fixed pair set; each pair's reference log-probs computed once."""

    def __init__(self, policy: Policy, pairs: list[Pair], prompts, chosen, rejected, seed: int, preference=None):
        self.policy, self.pairs = policy, pairs
        self.prompts, self.chosen, self.rejected = prompts, chosen, rejected  # token lists per pair
        self.preference = preference  # P(chosen preferred) per pair, or None for hard labels
        self.ref_cache: dict[int, tuple[float, float]] = {}
        self.order = Shuffled(len(pairs), random.Random(seed))

    @classmethod
    def from_text(cls, policy: Policy, pairs: list[Pair], max_prompt_tokens: int, seed: int, where: str = "preference pairs") -> OfflinePairs:
        tok = policy.tokenizer
        enc = lambda texts, **kw: tok(texts, add_special_tokens=False, **kw)["input_ids"]  # noqa: E731
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []  # the policy learns to stop
        prompts = enc([p.prompt for p in pairs], truncation=True, max_length=max_prompt_tokens)
        chosen = [ids + eos for ids in enc([p.chosen for p in pairs])]
        rejected = [ids + eos for ids in enc([p.rejected for p in pairs])]
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
        return {"order": self.order.state_dict(), "ref_cache": {str(k): list(v) for k, v in cache.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.ref_cache = {int(k): tuple(v) for k, v in state["ref_cache"].items()}

    def next(self, batch_size: int) -> PairBatch:
        idx = self.order.take(batch_size)  # the whole batch, the same on every rank
        start, stop = distributed.shard(len(idx))
        idx = idx[start:stop]  # this rank's pairs
        ids, attn, q, mask = pair_batch(
            self.policy, [self.prompts[i] for i in idx], [self.chosen[i] for i in idx], [self.rejected[i] for i in idx]
        )
        B = len(idx)
        missing = [j for j, i in enumerate(idx) if i not in self.ref_cache]
        if missing:  # only the pairs never seen before go through the reference
            rows = torch.tensor(missing + [j + B for j in missing], device=ids.device)
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


class OnlinePairs:
    """Two samples per prompt from the current policy; the reward source picks the chosen one."""

    def __init__(self, policy: Policy, reward: RewardSource, prompts: list[list[int]], sampler, seed: int):
        self.policy, self.reward, self.prompts, self.sampler = policy, reward, prompts, sampler
        self.rng = random.Random(seed)
        self.order = Shuffled(len(prompts), self.rng)

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict()}  # its rng is the sampler's too

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])

    def next(self, batch_size: int) -> PairBatch:
        idx = self.order.take(batch_size)
        queries = self.sampler.sample([self.prompts[i] for i in idx], self.rng)  # the whole batch, on every rank
        start, stop = distributed.shard(len(queries))
        queries = queries[start:stop]
        n = 2 * len(queries)  # this rank's share of the random numbers: its own samples
        g = rollout.generate(self.policy, queries * 2, self.sampler.generation_kwargs(), rows=(distributed.rank() * n, distributed.world() * n))
        ids, attn, q, mask = g.input_ids, g.attention_mask, g.query_len, g.mask
        texts_q, texts_r = rollout.decode(self.policy, ids, attn, q)
        scores = rollout.score(self.reward, texts_q, texts_r, self.policy.device)
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


@torch.no_grad()
def bradley_terry_pairs(
    policy: Policy, reward: RewardSource, prompts: list[list[int]], n: int, seed: int
) -> OfflinePairs:
    """For one-token problems: n pairs of two distinct vocabulary tokens drawn uniformly,
    labelled by the Bradley-Terry model of the reward, P(y1 preferred) = sigma(r(x, y1) -
    r(x, y2)), as a soft label: the DPO loss then takes the expectation over the label
    instead of one coin flip per pair, and its minimiser is exactly the optimum pi*."""
    rng = random.Random(seed)
    tok = policy.tokenizer
    text = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows, q_ids, c_ids, r_ids, preference = [], [], [], [], []
    for i in range(n):
        x = prompts[i % len(prompts)]
        y1, y2 = rng.sample(range(len(tok)), 2)
        r1, r2 = reward.score([text(x)] * 2, [text([y1]), text([y2])]).tolist()
        rows.append(Pair(text(x), text([y1]), text([y2])))
        q_ids.append(list(x)), c_ids.append([y1]), r_ids.append([y2])
        preference.append(1 / (1 + math.exp(-(r1 - r2))))
    return OfflinePairs(policy, rows, q_ids, c_ids, r_ids, seed, preference)
