"""Prompt sets: the embedded review generator, a local file, or a hub dataset.

A prompt is plain text, or a conversation: a list of {"role", "content"} messages (the
conversational format of TRL's datasets), rendered with the tokenizer's chat template and
the generation prompt (`render`). A rendered conversation is a `Rendered` token list:
samplers never cut it (`sample_queries`), as a cut would cut its template.

A prompt file's other fields (a reference `answer`, an id) travel with each prompt
(`Prompts.fields`, then `PromptIds.fields` on its tokens and on the query cut from it) to
the reward source, which gets them as columns (`rollout.score`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence, Union

from rlhf.contracts.schema import DataConfig

MAX_PROMPT_TOKENS = 64  # prompts are cut to this before the sampler cuts a query out of them

# The embedded prompts come from seeds of their own, apart from the build's and the run's,
# so runs with different seeds are evaluated on the same held-out prompts.
EMBEDDED_TRAIN_SEED, EMBEDDED_EVAL_SEED = 10_001, 10_002


class Prompts(list):
    """Prompts (text or conversations) and, aligned with them, each one's other data fields."""

    def __init__(self, prompts=(), fields: Sequence[dict] | None = None):
        super().__init__(prompts)
        self.fields = list(fields) if fields is not None else [{} for _ in self]

    def take(self, start: int, stop: int | None = None) -> Prompts:
        return Prompts(self[start:stop], self.fields[start:stop])


def load_prompts(cfg: DataConfig) -> tuple[Prompts, Prompts]:
    """(training prompts, held-out prompts): text or conversations, with their other fields;
    with `as_chat`, text prompts become a user's message."""
    train, held_out = _load_prompts(cfg)
    if cfg.as_chat:
        def chat(ps):
            return Prompts([[{"role": "user", "content": p}] if isinstance(p, str) else p for p in ps], ps.fields)

        train, held_out = chat(train), chat(held_out)
    return train, held_out


def _load_prompts(cfg: DataConfig) -> tuple[Prompts, Prompts]:
    if cfg.prompts in ("arithmetic", "products") and not cfg.prompt_list:
        from rlhf.embedded.arithmetic import prompts

        op = "+" if cfg.prompts == "arithmetic" else "*"
        return Prompts(*prompts(cfg.n_train, "train", op)), Prompts(*prompts(cfg.n_eval, "eval", op))
    if cfg.prompt_list:  # the same few prompts for both, as in the toy problem
        def cycle(n):
            return Prompts([cfg.prompt_list[i % len(cfg.prompt_list)] for i in range(n)])

        return cycle(cfg.n_train), cycle(cfg.n_eval)
    if cfg.prompts == "embedded":
        from rlhf.embedded.corpus import reviews

        train = Prompts([t for t, _ in reviews(cfg.n_train, EMBEDDED_TRAIN_SEED)])
        held_out = Prompts([t for t, _ in reviews(cfg.n_eval, EMBEDDED_EVAL_SEED)])
    elif Path(cfg.prompts).suffix in PROMPT_FILES:
        texts = read_prompt_file(Path(cfg.prompts), cfg.text_field)
        held_out, train = texts.take(0, cfg.n_eval), texts.take(cfg.n_eval, cfg.n_eval + cfg.n_train)
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
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: starts like UTF-16 text (a byte-order mark) but is not ({e.reason} at byte "
                             f"{e.start}); {setting} must be a UTF-8 (or UTF-16) text file: save it as UTF-8") from None
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


Prompt = Union[str, list]  # text, or a conversation: [{"role": ..., "content": ...}, ...]


def read_prompt_file(path: Path, field: str) -> Prompts:
    if path.suffix == ".txt":
        return Prompts([line for line in read_text(path, "data.prompts").splitlines() if line.strip()])
    return prompt_records([row for _, row in read_records(path, "data.prompts")], field, str(path))


def prompt_records(rows: Sequence[object], field: str, where: str) -> Prompts:
    """Each record's prompt (text or a conversation) in `field`, and its other fields."""
    texts, fields = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: row {i} is a JSON {type(row).__name__}, not an object; each row is an object "
                             f'such as {{"{field}": "..."}}')
        value = row.get(field)
        if is_conversation(value):
            check_conversation(value, f"{where}: row {i}, field {field!r}")
        elif not isinstance(value, str):
            have = f" (it has {sorted(row)})"
            raise ValueError(f"{where}: row {i} has no field {field!r} holding text or a list of messages{have}; "
                             "set data.text_field")
        elif not value.strip():
            continue
        texts.append(value)
        fields.append({k: v for k, v in row.items() if k != field})
    return Prompts(texts, fields)


ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know


def is_conversation(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_conversation(messages: list, where: str) -> None:
    for j, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {j} is {m!r}; a conversation is a list of "
                             '{"role": "user", "content": "..."} messages')
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {j} has role {m['role']!r}; a role is one of {', '.join(ROLES)} "
                             "(a chat template renders any other as it is, which the model never saw)")


class PromptIds(list):
    """A prompt's (or a query's) token ids, with the prompt's other data fields."""

    fields: dict = {}


class Rendered(PromptIds):
    """The token ids of a conversation rendered with the chat template: a query as it is."""


def with_fields(ids: list[int], fields: dict | None) -> list[int]:
    """`ids` carrying `fields` (a Rendered stays one); plain ids when there are none."""
    if not fields:
        return ids
    out = ids if isinstance(ids, PromptIds) else PromptIds(ids)
    out.fields = fields
    return out


def render(tokenizer, messages: list, generation_prompt: bool = True) -> str:
    """A conversation as the chat template writes it (with the assistant's generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the data holds conversations (lists of role/content messages), but this model's tokenizer "
                         "has no chat template to render them with; use an instruction-tuned model, give one with "
                         "policy.chat_template=<a Jinja file>, or give plain-text prompts")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


class RenderedText(str):
    """A query's text as the chat template rendered it (special tokens kept): a reward source
    reading prompt and response together appends the response directly (`text_of`)."""


def response_ids(tokenizer, prompt: Prompt, response: str, ends: Sequence[int]) -> list[int]:
    """The tokens a policy produces for `response` after `prompt`, up to and including the
    token that ends it: the chat template's end of turn for a conversation (what the template
    writes after the assistant's message, up to the first end token), else the EOS."""
    if isinstance(prompt, str):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return tokenizer(response, add_special_tokens=False)["input_ids"] + eos
    head = render(tokenizer, prompt)
    whole = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
    ids = tokenizer(whole[len(head):] if whole.startswith(head) else response, add_special_tokens=False)["input_ids"]
    stop = next((i for i, t in enumerate(ids) if t in set(ends)), None)
    if stop is not None:
        return ids[: stop + 1]
    end = tokenizer.eos_token_id if tokenizer.eos_token_id in ends else ends[0]  # Llama 3's <|eot_id|>, not the sorted first
    return ids + [end]


def encode_prompt(tokenizer, prompt: Prompt, max_tokens: int = MAX_PROMPT_TOKENS) -> list[int]:
    """A prompt's token ids: text cut to max_tokens, no special tokens added; a conversation
    rendered whole (a `Rendered`)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if is_rendered(tokenizer, ids):  # already rendered by a chat template (rlhf-label's pairs): kept whole
            return Rendered(ids)
        return ids[:max_tokens]
    return Rendered(tokenizer(render(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def special_ids(tokenizer) -> set[int]:
    """Every special token's id: the named ones and every added token marked special (a chat
    template's markers, such as <|im_start|>, are often only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def is_rendered(tokenizer, ids: Sequence[int]) -> bool:
    """Token ids holding special tokens other than EOS, BOS and padding: a chat template's rendering."""
    markers = special_ids(tokenizer) - {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
    return any(t in markers for t in ids)


def check_whole_prompts(prompts: Sequence[list[int]], context: int | None, max_new_tokens: int, where: str) -> None:
    """Prompts used whole (rendered conversations) must leave room for the response in the
    model's context: refused before training, naming the first that does not."""
    if context is None:
        return
    long = [i for i, p in enumerate(prompts) if isinstance(p, Rendered) and len(p) + max_new_tokens > context]
    if long:
        i = long[0]
        raise ValueError(f"{where}: prompt {i} is {len(prompts[i])} tokens rendered with the chat template; with "
                         f"sampler.max_new_tokens={max_new_tokens} that is more than the model's context of {context} "
                         f"({len(long)} such prompts); shorten or drop them, or lower sampler.max_new_tokens")


def sample_queries(sampler, prompts: Sequence[list[int]], rng) -> list[list[int]]:
    """The sampler's queries for plain prompts; rendered conversations whole. Each query
    carries its prompt's fields."""
    plain = [list(p) for p in prompts if not isinstance(p, Rendered)]
    cut = iter(sampler.sample(plain, rng))  # also when empty: the sampler may draw a per-batch setting
    return [with_fields(Rendered(p) if isinstance(p, Rendered) else list(next(cut)), getattr(p, "fields", None))
            for p in prompts]


def _read_hub(cfg: DataConfig) -> tuple[Prompts, Prompts]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"data.prompts={cfg.prompts!r} names a hub dataset, which needs the `datasets` "
            "package: pip install datasets"
        ) from e
    from rlhf.core.model.hub import check_dataset

    check_dataset(cfg.prompts, "data.prompts")
    def rows(split: str, n: int) -> Prompts:
        table = datasets.load_dataset(cfg.prompts, cfg.subset, split=split)
        return prompt_records(list(table.select(range(min(n, len(table))))), cfg.text_field, f"hub dataset {cfg.prompts}")

    if cfg.eval_split:
        return rows(cfg.split, cfg.n_train), rows(cfg.eval_split, cfg.n_eval)
    both = rows(cfg.split, cfg.n_eval + cfg.n_train)
    return both.take(cfg.n_eval), both.take(0, cfg.n_eval)


def tokenize_prompts(tokenizer, texts: list[Prompt]) -> list[list[int]]:
    """Token ids of each prompt: text cut to MAX_PROMPT_TOKENS, no special tokens added; a
    conversation rendered with the chat template, whole (a `Rendered`). A prompt with no tokens
    is refused: the first response token needs a context."""
    plain = [t for t in texts if isinstance(t, str)]
    cut = iter(tokenizer(plain, add_special_tokens=False, truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]
               if plain else [])  # one call for all the text: the fast tokenizer batches it
    ids = [next(cut) if isinstance(t, str) else encode_prompt(tokenizer, t) for t in texts]
    if isinstance(texts, Prompts):
        ids = [with_fields(x, f) for x, f in zip(ids, texts.fields)]
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
        return {"rng": self.rng.getstate(), "order": list(self.order), "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        """The saved position; over data of another size (a forced resume), a new pass from here."""
        self.rng.setstate(state["rng"])
        self.order = list(state["order"]) if state.get("n", self.n) == self.n else []


# episodes' tokens (rlhf.core.rollout.episodes): the first observation, and each answer after a policy turn
def is_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def first_query(tokenizer, observation: Any) -> list[int]:
    """The episode's first observation as its query: a conversation (or, with a chat template, a
    text as the user's message) rendered with the generation prompt; plain text as it is."""
    if isinstance(observation, list):
        return tokenizer(render(tokenizer, observation), add_special_tokens=False)["input_ids"]
    if is_chat(tokenizer):
        return tokenizer(render(tokenizer, [{"role": "user", "content": str(observation)}]),
                         add_special_tokens=False)["input_ids"]
    return tokenizer(str(observation), add_special_tokens=False)["input_ids"]


def observation_ids(tokenizer, observation: Any, role: str = "user") -> list[int]:
    """The environment's answer, tokenised once, as it follows the policy's turn: with a chat
    template, the tokens the template writes for a new message of `role` (and the next
    assistant turn's prompt) after an assistant's message; plain text as it is."""
    text = observation if isinstance(observation, str) else str(observation)
    if not is_chat(tokenizer):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    before = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    head = tokenizer.apply_chat_template(before, tokenize=False)
    whole = tokenizer.apply_chat_template([*before, {"role": role, "content": text}], add_generation_prompt=True,
                                          tokenize=False)
    if not whole.startswith(head):
        raise ValueError("the chat template does not write a new message after the ones before it (it rewrites the "
                         "conversation's start); episodes need one that appends: give policy.chat_template=<file>")
    # the policy's turn ends at its end-of-turn token: what the template writes after that token (a newline
    # before the next header) is the answer's, so that the episode reads as the template writes it
    end = tokenizer.eos_token or ""
    cut = head.find(end, head.rfind("a")) if end else -1
    start = cut + len(end) if cut >= 0 else len(head)
    return tokenizer(whole[start:], add_special_tokens=False)["input_ids"]
