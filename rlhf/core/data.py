"""Prompt sets: the embedded review generator, a local file, or a hub dataset."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf.contracts.schema import DataConfig

MAX_PROMPT_TOKENS = 64  # prompts are cut to this before the sampler cuts a query out of them

# The embedded prompts come from seeds of their own, apart from the build's and the run's,
# so runs with different seeds are evaluated on the same held-out prompts.
EMBEDDED_TRAIN_SEED, EMBEDDED_EVAL_SEED = 10_001, 10_002


def load_prompts(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) as text."""
    if cfg.prompt_list:  # the same few prompts for both, as in the toy problem
        cycle = lambda n: [cfg.prompt_list[i % len(cfg.prompt_list)] for i in range(n)]  # noqa: E731
        return cycle(cfg.n_train), cycle(cfg.n_eval)
    if cfg.prompts == "embedded":
        from rlhf.embedded.corpus import reviews

        train = [t for t, _ in reviews(cfg.n_train, EMBEDDED_TRAIN_SEED)]
        held_out = [t for t, _ in reviews(cfg.n_eval, EMBEDDED_EVAL_SEED)]
    elif Path(cfg.prompts).suffix in (".txt", ".jsonl", ".json"):
        texts = read_prompt_file(Path(cfg.prompts), cfg.text_field)
        held_out, train = texts[: cfg.n_eval], texts[cfg.n_eval : cfg.n_eval + cfg.n_train]
    else:
        train, held_out = _read_hub(cfg)
    for name, texts in (("training", train), ("held-out", held_out)):
        if not texts:
            raise ValueError(
                f"data.prompts={cfg.prompts!r} gave no {name} prompts; it needs at least "
                f"data.n_eval + 1 = {cfg.n_eval + 1} non-empty texts"
            )
    return train, held_out


def read_prompt_file(path: Path, field: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"data.prompts: no such file {path}")
    lines = path.read_text().splitlines()
    if path.suffix == ".txt":
        return [line for line in lines if line.strip()]
    rows = json.loads(path.read_text()) if path.suffix == ".json" else [json.loads(x) for x in lines if x.strip()]
    texts = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(f"{path}: row {i} has no string field {field!r} (set data.text_field)")
        if row[field].strip():
            texts.append(row[field])
    return texts


def _read_hub(cfg: DataConfig) -> tuple[list[str], list[str]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"data.prompts={cfg.prompts!r} names a hub dataset, which needs the `datasets` "
            "package: pip install datasets"
        ) from e
    train = datasets.load_dataset(cfg.prompts, split=cfg.split)[cfg.text_field]
    if cfg.eval_split:
        held_out = datasets.load_dataset(cfg.prompts, split=cfg.eval_split)[cfg.text_field][: cfg.n_eval]
    else:
        held_out, train = train[: cfg.n_eval], train[cfg.n_eval :]
    return list(train[: cfg.n_train]), list(held_out)


def tokenize_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, cut to MAX_PROMPT_TOKENS, no special tokens added."""
    return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]


class Shuffled:
    """Endless shuffled passes over range(n), taken a batch at a time."""

    def __init__(self, n: int, rng: random.Random):
        self.n, self.rng, self.order = n, rng, []

    def take(self, k: int) -> list[int]:
        while len(self.order) < k:  # reshuffle once per pass
            self.order += self.rng.sample(range(self.n), self.n)
        out, self.order = self.order[:k], self.order[k:]
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.order = list(state["order"])
