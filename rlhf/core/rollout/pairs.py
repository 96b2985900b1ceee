"""Preference pairs (prompt, chosen, rejected): loading, batching, reference log-probs.

Pairs come from the embedded generator, a local JSON/JSONL/Parquet file, or a hub
dataset. The batch sources `preference_pairs` and `sampled_pairs` (rlhf.core.rollout.sources)
turn them, or two policy samples per prompt, into `PairBatch`es.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from rlhf.contracts.schema import DataConfig
from rlhf.core.model.policy import Policy
from rlhf.core.rollout.data import check_conversation, is_conversation, read_records

EMBEDDED_PAIRS_TRAIN_SEED, EMBEDDED_PAIRS_EVAL_SEED = 20_001, 20_002


@dataclass(frozen=True)
class Pair:
    prompt: str | tuple  # text, or a conversation (a tuple of role/content message dicts)
    chosen: str
    rejected: str
    row: int = field(default=-1, compare=False)  # its row in the file it came from, for error messages


class MessageDict(dict):
    """A message of a conversational prompt, hashable so that pairs compare and dedupe."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, str(v)) for k, v in self.items())))


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
    elif Path(cfg.pairs).expanduser().is_file():  # a local file of a kind we do not read (a folder goes to datasets)
        raise ValueError(f"data.pairs={cfg.pairs}: {Path(cfg.pairs).suffix or 'this'} files are not read; use .jsonl, "
                         ".json or .parquet with the fields data.prompt_field, data.chosen_field, data.rejected_field")
    else:
        rows, where = _read_hub(cfg), f"hub dataset {cfg.pairs}"
    # rlhf-label's files also record ties and skips: they are answers, not preferences
    pairs = [_pair(row, i, cfg, where) for i, row in enumerate(rows)
             if not (isinstance(row, dict) and row.get("label") in ("tie", "skip"))]
    if len(pairs) <= cfg.n_eval:
        raise ValueError(f"{where}: {len(pairs)} pairs, need more than data.n_eval={cfg.n_eval}")
    first: dict[Pair, int] = {}
    repeats = [(p.row, first.setdefault(p, p.row)) for p in pairs if first.setdefault(p, p.row) != p.row]
    if repeats:  # kept: two labellers agreeing is data, but often it is a file appended twice
        warnings.warn(f"{where}: {len(repeats)} pair(s) repeat an earlier one exactly (first: row {repeats[0][0]} = "
                      f"row {repeats[0][1]}); they are kept and count twice", stacklevel=2)
    return pairs[cfg.n_eval : cfg.n_eval + cfg.n_train], pairs[: cfg.n_eval]


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"data.pairs: no such file {path}")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [row for _, row in read_records(path, "data.pairs")]


def _read_hub(cfg: DataConfig) -> list[dict]:
    import datasets

    from rlhf.core.model.hub import check_dataset

    check_dataset(cfg.pairs, "data.pairs")

    return list(datasets.load_dataset(cfg.pairs, cfg.subset, split=cfg.split))


def _pair(row: dict, i: int, cfg: DataConfig, where: str) -> Pair:
    """A row of text fields, or of the conversational format: the prompt a list of messages,
    chosen and rejected each a list holding the assistant's message (as TRL's datasets)."""
    fields = (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    if not isinstance(row, dict):
        raise ValueError(f"{where}: row {i} is a JSON {type(row).__name__}, not an object; each row is an object such as "
                         f'{{"{fields[0]}": "...", "{fields[1]}": "...", "{fields[2]}": "..."}}')
    values = [row.get(f) for f in fields]
    if is_conversation(values[0]):
        check_conversation(values[0], f"{where}: row {i}, field {fields[0]!r}")
        values[0] = tuple(MessageDict(m) for m in values[0])
    for k in (1, 2):
        if is_conversation(values[k]):
            check_conversation(values[k], f"{where}: row {i}, field {fields[k]!r}")
            said = [m["content"] for m in values[k] if m["role"] == "assistant"]
            if len(said) != 1:
                raise ValueError(f"{where}: row {i}, field {fields[k]!r} holds {len(said)} assistant messages; "
                                 "a response is one assistant message")
            values[k] = said[0]
    for name, value in zip(fields, values):
        if not isinstance(value, (str, tuple)) or (name != fields[0] and not isinstance(value, str)):
            raise ValueError(f"{where}: row {i} has no field {name!r} holding text (or, in the conversational "
                             "format, messages) (fields: data.*_field)")
    if not values[1].strip() or not values[2].strip():
        raise ValueError(f"{where}: row {i} has an empty chosen or rejected response")
    if values[1].strip() == values[2].strip():  # no preference to learn: a data error, not a pair
        raise ValueError(f"{where}: row {i} has the same chosen and rejected response ({values[1][:60]!r}); "
                         "remove it (rlhf-label records ties as label \"tie\", which are left out)")
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
def reference_logps(policy: Policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, q: int,
                    mask: torch.Tensor) -> torch.Tensor:
    """Sum of reference log-probs over each row's response tokens. (2B,)"""
    return (policy.reference_logprobs(input_ids, attention_mask, q) * mask).sum(1)
