"""The embedded verifiable task: sums of two numbers below 100, asked in a chat.

`policy.path=arithmetic` is a tiny Qwen2-style chat model (ChatML, digits as single tokens)
that the build fine-tunes (SFT) on part of the training problems until it answers some
correctly, not all; `data.prompts=arithmetic` gives conversations ("What is 37 + 45?") with
the reference `answer` ("82") as a field, for `reward=verifiable`. The 10,000 problems are
split once: every tenth (by a hash) is held out, never seen in SFT nor in RL training.

Built into the cache like the embedded default (`arithmetic-<key>`), deterministically.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

VERSION = 1


@dataclass(frozen=True)
class ArithmeticSpec:
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    sft_steps: int = 900
    sft_problems: int = 500  # training problems SFT sees: it then answers about 3 in 4 held-out ones greedily
    sft_batch: int = 64
    lr: float = 3e-3

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"v": VERSION, **asdict(self)}, sort_keys=True).encode()).hexdigest()[:12]


def problems(split: str) -> list[tuple[int, int]]:
    """All (a, b) of a split: "eval" holds one problem in ten, "train" the rest."""
    held = lambda a, b: int(hashlib.md5(f"{a}+{b}".encode()).hexdigest(), 16) % 10 == 0  # noqa: E731
    return [(a, b) for a in range(100) for b in range(100) if held(a, b) == (split == "eval")]


def question(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def prompts(n: int, split: str) -> tuple[list[list[dict]], list[dict]]:
    """n conversations of `split`, shuffled with a fixed seed, and each one's fields ({"answer": ...})."""
    pool = problems(split)
    random.Random(f"arithmetic-{split}").shuffle(pool)
    chosen = [pool[i % len(pool)] for i in range(n)]
    return [question(a, b) for a, b in chosen], [{"answer": str(a + b)} for a, b in chosen]


def policy_path(spec: ArithmeticSpec = ArithmeticSpec()) -> str:
    """Directory of the SFT arithmetic model (built on first use, ~30 s on 2 cores)."""
    from rlhf.embedded.build import cached_model

    return cached_model(f"arithmetic-{spec.key()}", lambda out: _build(spec, out),
                        "building the arithmetic model (one time, ~30 s)")


def _build(spec: ArithmeticSpec, out: Path) -> None:
    import torch

    from rlhf.embedded.chat_models import build_tokenizer, chat_model

    tokenizer = build_tokenizer("qwen2", digits=True)
    model = chat_model("qwen2", tokenizer, hidden=spec.hidden, layers=spec.layers, seed=spec.seed)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = []
    pool = problems("train")
    random.Random(spec.seed).shuffle(pool)
    for a, b in pool[: spec.sft_problems]:
        head = tokenizer.apply_chat_template(question(a, b), add_generation_prompt=True, tokenize=False)
        q = tokenizer(head, add_special_tokens=False)["input_ids"]
        r = tokenizer(str(a + b), add_special_tokens=False)["input_ids"] + [end]
        rows.append((q, r))
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.sft_steps, pct_start=0.1)
    model.train()
    pad = tokenizer.pad_token_id
    for _ in range(spec.sft_steps):
        batch = [rows[i] for i in torch.randint(len(rows), (spec.sft_batch,), generator=g).tolist()]
        width = max(len(q) + len(r) for q, r in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (q, r) in enumerate(batch):
            ids[i, : len(q) + len(r)] = torch.tensor(q + r)
            labels[i, len(q) : len(q) + len(r)] = torch.tensor(r)  # the answer and its end of turn are the targets
            mask[i, : len(q) + len(r)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "built_by.json").write_text(json.dumps({"task": "arithmetic", **asdict(spec)}) + "\n")
