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
    elif Path(cfg.prompts).suffix in PROMPT_FILES:
        texts = read_prompt_file(Path(cfg.prompts), cfg.text_field)
        held_out, train = texts[: cfg.n_eval], texts[cfg.n_eval : cfg.n_eval + cfg.n_train]
    elif Path(cfg.prompts).expanduser().is_file():  # a local file of a kind we do not read (a folder goes to datasets)
        raise ValueError(f"data.prompts={cfg.prompts}: {Path(cfg.prompts).suffix or 'this'} files are not read; "
                         "use .txt (a prompt a line), .jsonl or .json (records with the field data.text_field)")
    else:
        train, held_out = _read_hub(cfg)
    for name, texts in (("training", train), ("held-out", held_out)):
        if not texts:
            raise ValueError(
                f"data.prompts={cfg.prompts!r} gave no {name} prompts; it needs at least "
                f"data.n_eval + 1 = {cfg.n_eval + 1} non-empty texts"
            )
    return train, held_out


PROMPT_FILES = (".txt", ".jsonl", ".json")


def read_text(path: Path, setting: str) -> str:
    """A text file's contents: UTF-8 (a BOM allowed), or UTF-16 with its BOM; anything else
    (a binary file, another encoding) is refused naming the file, the byte and the fix."""
    if path.is_dir():
        raise ValueError(f"{setting}={path} is a directory; name a file")
    if not path.is_file():
        raise FileNotFoundError(f"{setting}: no such file {path}")
    data = path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}: {e.reason}); "
                         f"{setting} must be a UTF-8 (or UTF-16 with a BOM) text file: save it as UTF-8") from None
    if "\x00" in text:
        raise ValueError(f"{path}: holds NUL bytes, so it is not a text file (a binary file, or UTF-16 without "
                         f"a BOM?); {setting} must be UTF-8 text")
    return text


def read_records(path: Path, setting: str) -> list[tuple[int, object]]:
    """(line number, value) of each record of a .jsonl file (blank lines skipped), or
    (index, value) of each element of a .json list; a line that is not JSON is refused
    naming the file and the line."""
    text = read_text(path, setting)
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: a .json file here is a list of records, this one is a {type(rows).__name__}")
        return list(enumerate(rows))
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e.msg}, column {e.colno}); fix or remove that line") from None
    return records


def read_prompt_file(path: Path, field: str) -> list[str]:
    if path.suffix == ".txt":
        return [line for line in read_text(path, "data.prompts").splitlines() if line.strip()]
    rows = [row for _, row in read_records(path, "data.prompts")]
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
    from rlhf.core.hub import check_dataset

    check_dataset(cfg.prompts, "data.prompts")
    train = datasets.load_dataset(cfg.prompts, split=cfg.split)[cfg.text_field]
    if cfg.eval_split:
        held_out = datasets.load_dataset(cfg.prompts, split=cfg.eval_split)[cfg.text_field][: cfg.n_eval]
    else:
        held_out, train = train[: cfg.n_eval], train[cfg.n_eval :]
    return list(train[: cfg.n_train]), list(held_out)


def tokenize_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, cut to MAX_PROMPT_TOKENS, no special tokens added. A prompt
    with no tokens is refused: the first response token needs a context."""
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"prompt {empty[0]} ({texts[empty[0]]!r}) has no tokens after tokenisation ({len(empty)} such "
                         "prompts): the first response token needs a context; remove them from data.prompts / "
                         "data.prompt_list")
    return ids


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
