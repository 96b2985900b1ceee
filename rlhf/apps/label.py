"""`rlhf-label`: a person compares two sampled responses; the answers become preference pairs.

For each prompt the policy samples two responses with the sampler's settings; the person
picks the better one, calls it a tie, or skips it. Every answer is appended to a JSONL
file, flushed and fsync'd, before the next pair is shown, so nothing is lost when the
browser, the terminal or the process goes away. A restarted session reads the file and
continues with the first pair not yet answered (pairs are numbered; the answered numbers
are in the file), so nothing is asked twice.

A record (one line):

    {"prompt": ..., "chosen": ..., "rejected": ..., "label": "preferred" | "tie" | "skip",
     "index": 7, "who": "ann", "when": "2026-11-23T10:00:00+00:00",
     "policy": "<path or run dir>", "sampler": {...settings}, "seed": 0}

`chosen`/`rejected` are the person's preference when `label` is "preferred"; for a tie or
a skip they are the left and right response as shown. `rlhf-train-rm data.pairs=<file>`
and `rlhf-train optimizer=dpo data.pairs=<file>` read the file and use the preferred rows
(ties and skips are counted and left out).
"""

from __future__ import annotations

import datetime
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlhf.contracts import registry
from rlhf.contracts.checks import require
from rlhf.contracts.schema import DataConfig
from rlhf.core.model.policy import Policy
from rlhf.core.parallel.distributed import pick_device
from rlhf.core.rollout import collect, sampling
from rlhf.core.rollout.data import load_prompts, read_prompt_file, sample_queries, tokenize_prompts
from rlhf.core.run import rundir
from rlhf.core.run.rundir import RunDirBusy, RunLock

CHOICES = ("left", "right", "tie", "skip")
LABELS = {"left": "preferred", "right": "preferred", "tie": "tie", "skip": "skip"}
NOT_PREFERENCES = ("tie", "skip")  # labels that readers of the file leave out


class PreferenceFileError(ValueError):
    """The preference file cannot be continued: names the line and the fix."""


class PreferenceFile:
    """The JSONL file of answers: read and checked at start, appended one durable line at a time."""

    def __init__(self, path: Path, lock: bool = False, setting: str = "label.out"):
        self.path, self.setting = path, setting  # the setting that names the file, for messages
        self.records: list[dict] = []
        if path.is_dir():
            raise PreferenceFileError(f"{setting}={path} is a directory; name a file in it, e.g. "
                                      f"{setting}={path / 'preferences.jsonl'}")
        self.owner = self.lock() if lock else None  # before reading: it may cut a half-written line
        if path.exists():
            self.records = self._read()

    def lock(self) -> RunLock:
        """This process's alone while it labels: a second rlhf-label (or rlhf-make-pairs) on the
        same file is refused, naming the first (two would answer every pair twice), whatever path
        names the file: the lock file sits beside the real file (a symlink leads there), and the
        file itself is held too (a hard link is the same file under another name)."""
        real = Path(os.path.realpath(self.path))
        owner = RunLock(real.with_name(real.name + ".lock"), f"preference file {real}").acquire()
        self._hold()
        return owner

    def _hold(self) -> None:
        """An exclusive lock on the file itself, once it exists, for the life of the process."""
        import fcntl

        if getattr(self, "_held", None) is not None or not self.path.exists():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusy(f"preference file {self.path} is in use by another process (under another name: a hard "
                             "link); wait for it to end, or use another file") from None
        self._held = fd

    def _read(self) -> list[dict]:
        records = []
        fix = f"fix or remove that line, or choose another file with {self.setting}=<path>"
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # the process died writing its last answer: that one is lost
            warnings.warn(f"{self.path}: its last line was written only in part (a crash?) and is left out; "
                          "that pair will be asked again", stacklevel=2)
            data = data[: data.rfind(b"\n") + 1]
            self._truncate_to(len(data))
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise PreferenceFileError(f"{self.path}: not UTF-8 text (byte {e.start}); {fix}") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = rundir.from_json(line)
            except json.JSONDecodeError as e:
                raise PreferenceFileError(f"{self.path}: line {n} is not JSON ({e.msg}); {fix}") from None
            missing = ([k for k in ("prompt", "chosen", "rejected", "label", "index") if k not in record]
                       if isinstance(record, dict) else ["(not an object)"])
            if missing:
                raise PreferenceFileError(f"{self.path}: line {n} lacks {', '.join(missing)}; "
                                          f"it was not written by rlhf-label; {fix}")
            if record["label"] not in ("preferred", *NOT_PREFERENCES) or not isinstance(record["index"], int):
                raise PreferenceFileError(f"{self.path}: line {n} has label {record['label']!r} and index "
                                          f"{record['index']!r} (expected preferred/tie/skip and a number); {fix}")
            records.append(record)
        return records

    def drop_last(self, n: int) -> None:
        """Remove the last n records from the file (cut durably) and from memory."""
        if n <= 0:
            return
        data = self.path.read_bytes()
        starts, pos = [], 0  # where each record's line begins (blank lines are no records)
        for text in data.splitlines(keepends=True):
            if text.strip():
                starts.append(pos)
            pos += len(text)
        cut = starts[-n]
        self._truncate_to(cut)
        del self.records[-n:]

    def _truncate_to(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())

    @property
    def answered(self) -> set[int]:
        return {r["index"] for r in self.records}

    def append(self, record: dict) -> None:
        """One line, on disk (flushed and fsync'd) before this returns."""
        self.extend([record])

    def extend(self, records: list[dict]) -> None:
        """One line each, all on disk (flushed and fsync'd once) before this returns; a crash
        in between leaves whole lines and at most one part line, which the next reader cuts."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(rundir.to_json(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.records.extend(records)
        if self.owner is not None:
            self._hold()  # the file exists now: held under any name


@dataclass
class Pair:
    index: int
    prompt: str
    left: str
    right: str


class PairSource:
    """Pair number i: the i-th prompt of a seeded order, cut by the sampler, and two responses
    sampled from the policy with a seed of its own, so a restart shows the same pair i."""

    TRIES = 8  # resamples when the two responses are equal or one is empty

    def __init__(self, policy, sampler, prompts: list[list[int]], seed: int):
        if not prompts:
            raise ValueError("no prompts to label: check data.prompts")
        self.policy, self.sampler, self.prompts, self.seed = policy, sampler, prompts, seed
        self.order = list(range(len(prompts)))
        random.Random(seed).shuffle(self.order)
        self._cache: dict[int, Pair] = {}

    def __call__(self, index: int) -> Pair:
        if index not in self._cache:
            self._cache = {index: self._make(index)}  # the current pair only
        return self._cache[index]

    def _make(self, index: int) -> Pair:
        import torch

        prompt = self.prompts[self.order[index % len(self.order)]]
        query = sample_queries(self.sampler, [prompt], random.Random(f"{self.seed}:{index}"))[0]
        for attempt in range(self.TRIES):
            torch.manual_seed(hash((self.seed, index, attempt)) % 2**62)
            g = sampling.generate(self.policy, [query, query], self.sampler.generation_kwargs(), self.sampler.temperature)
            (q, _), responses = collect.decode(self.policy, g.input_ids, g.attention_mask, g.query_len)
            a, b = (r.strip() for r in responses)
            if a and b and a != b:
                return Pair(index, q, a, b)
        raise RuntimeError(
            f"pair {index}: in {self.TRIES} tries the policy gave two different non-empty responses to {q!r} "
            "in none; raise sampler.temperature or sampler.max_new_tokens, or set sampler.min_new_tokens"
        )


class Session:
    """The labelling session: which pair is next, recording answers, agreement."""

    def __init__(self, file: PreferenceFile, source: PairSource, total: int, meta: dict, reward=None):
        self.file, self.source, self.total, self.meta, self.reward = file, source, total, meta, reward

    def next_index(self) -> int | None:
        answered = self.file.answered
        return next((i for i in range(self.total) if i not in answered), None)

    def progress(self) -> dict:
        answered = self.file.answered
        done = sum(1 for i in range(self.total) if i in answered)
        labels = [r["label"] for r in self.file.records if r["index"] < self.total]
        return {"answered": done, "total": self.total, "preferred": labels.count("preferred"),
                "ties": labels.count("tie"), "skips": labels.count("skip")}

    def current(self) -> Pair | None:
        i = self.next_index()
        return None if i is None else self.source(i)

    def answer(self, index: int, choice: str) -> bool:
        """Record the answer to pair `index`. False (nothing written) when that pair is not
        the one being asked: already answered (a second tab, a double key press) or stale."""
        if choice not in CHOICES:
            raise ValueError(f"unknown choice {choice!r}: one of {', '.join(CHOICES)}")
        if index != self.next_index():
            return False
        pair = self.source(index)
        chosen, rejected = (pair.right, pair.left) if choice == "right" else (pair.left, pair.right)
        self.file.append({
            "prompt": pair.prompt, "chosen": chosen, "rejected": rejected, "label": LABELS[choice],
            "index": index, "shown": {"left": pair.left, "right": pair.right},
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **self.meta,
        })
        return True

    def agreement(self) -> dict | None:
        """How often the reward source ranks the person's chosen response above the rejected one."""
        if self.reward is None:
            return None
        rows = [r for r in self.file.records if r["label"] == "preferred"]
        if not rows:
            return {"pairs": 0, "agree": 0, "rate": None}
        prompts = [r["prompt"] for r in rows]
        chosen = list(self.reward.score(prompts, [r["chosen"] for r in rows]))
        rejected = list(self.reward.score(prompts, [r["rejected"] for r in rows]))
        agree = sum(float(c) > float(r) for c, r in zip(chosen, rejected))
        same = sum(float(c) == float(r) for c, r in zip(chosen, rejected))
        return {"pairs": len(rows), "agree": agree, "equal_scores": same, "rate": agree / len(rows),
                "reward": self.meta.get("reward")}


# --------------------------------------------------------------------- building a session


def build_session(cfg: DictConfig) -> Session:
    import torch

    label = cfg.label
    require("label", [("label.mode", label.mode, label.mode in ("web", "terminal"), "web or terminal"),
                      ("label.pairs", label.pairs, label.pairs >= 1, "at least 1")])
    file = PreferenceFile(Path(label.out).expanduser(), lock=True)  # a malformed file fails before any model loads
    sampler = registry.instantiate("sampler", cfg.sampler)
    reward = registry.instantiate("reward", cfg.reward) if cfg.reward is not None else None
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    policy = Policy.load_trained(OmegaConf.to_object(cfg.policy), pick_device(cfg.device))
    texts = label_prompts(cfg.data)
    prompts = tokenize_prompts(policy.tokenizer, texts)
    meta = {
        "who": label.who, "policy": cfg.policy.path, "seed": label.seed,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
        **({"reward": cfg.reward.get("_target_", "").rsplit(".", 1)[-1]} if cfg.reward is not None else {}),
    }
    meta["sampler"].pop("_target_", None)
    return Session(file, PairSource(policy, sampler, prompts, label.seed), label.pairs, meta, reward)


def label_prompts(data: DataConfig) -> list[str]:
    """Every prompt of a local file (up to data.n_train; none is held out), else the
    training prompts of load_prompts."""
    if not data.prompt_list and Path(data.prompts).suffix in (".txt", ".jsonl", ".json"):
        texts = read_prompt_file(Path(data.prompts), data.text_field)[: data.n_train]
        if not texts:
            raise ValueError(f"data.prompts={data.prompts!r} holds no non-empty prompt")
        return texts
    return load_prompts(data)[0]


def next_steps(out: str) -> str:
    return (f"train on them:  rlhf-train-rm data.pairs={out}\n"
            f"            or  rlhf-train optimizer=dpo data.pairs={out}")


def agreement_line(a: dict | None) -> str:
    if a is None:
        return "agreement: no reward source given (add reward=<name>, e.g. reward=learned_rm reward.path=<rm run>)"
    if not a["pairs"]:
        return "agreement: no preferences yet (ties and skips are not compared)"
    return f"agreement: the reward source prefers your choice in {a['agree']} of {a['pairs']} pairs ({a['rate']:.0%})"
