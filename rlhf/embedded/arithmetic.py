"""The embedded verifiable task: sums of two numbers below 100, asked in a chat.

`policy.path=arithmetic` is a tiny Qwen2-style chat model (ChatML, digits as single tokens)
that the build fine-tunes (SFT) on part of the training problems until it answers some
correctly, not all; `data.prompts=arithmetic` gives conversations ("What is 37 + 45?") with
the reference `answer` ("82") as a field, for `reward=verifiable`. The 10,000 problems are
split once: every tenth (by a hash) is held out, never seen in SFT nor in RL training.

How good the SFT model is does not come from a step count. A small model learning addition
from examples goes through a phase transition: for hundreds of steps it memorises, then
within a few dozen it generalises. A fixed step count chosen near that transition lands on
either side of it when floating-point rounding moves a little (another CPU, another library
build). So the build trains until a target it checks: every `check_every` steps it measures
the exact probability that a sample (temperature 1) answers a validation sum right, averaged
over `validation` training sums that SFT never sees (not the held-out ones), and stops at the
first check inside [`target_low`, `target_high`]. A check that jumps over the band goes back
to the one before and takes smaller steps from there. `built_by.json` says what it reached.

Built into the cache like the embedded default (`arithmetic-<key>`), deterministically.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

VERSION = 2  # 2: trained to a checked accuracy band instead of a fixed step count


@dataclass(frozen=True)
class ArithmeticSpec:
    seed: int = 0
    hidden: int = 64
    layers: int = 2
    sft_problems: int = 2000  # training sums SFT sees (with 500 it memorises them and seldom generalises)
    sft_batch: int = 64
    lr: float = 3e-3  # after a linear warm-up of `warmup` steps; constant, so that stopping anywhere is fair
    warmup: int = 100
    target_low: float = 0.55  # the band the expected sampled accuracy on validation sums must end in
    target_high: float = 0.75
    check_every: int = 10  # steps between accuracy checks
    validation: int = 500  # training sums SFT never sees, for the checks (the held-out sums are never used)
    max_steps: int = 4000  # the budget: the build fails past it, saying what it reached

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"v": VERSION, **asdict(self)}, sort_keys=True).encode()).hexdigest()[:12]


def problems(split: str) -> list[tuple[int, int]]:
    """All (a, b) of a split: "eval" holds one problem in ten, "train" the rest."""
    def held(a, b):
        return int(hashlib.md5(f"{a}+{b}".encode()).hexdigest(), 16) % 10 == 0
    return [(a, b) for a in range(100) for b in range(100) if held(a, b) == (split == "eval")]


def question(a: int, b: int, op: str = "+") -> list[dict]:
    return [{"role": "user", "content": f"What is {a} {op} {b}?"}]


def result(a: int, b: int, op: str = "+") -> int:
    return a * b if op == "*" else a + b


def prompts(n: int, split: str, op: str = "+") -> tuple[list[list[dict]], list[dict]]:
    """n conversations of `split`, shuffled with a fixed seed, and each one's fields ({"answer": ...}):
    sums (`op` "+", data.prompts=arithmetic) or products ("*", data.prompts=products: the
    calculator's task, which the model does not compute well on its own)."""
    pool = problems(split)
    random.Random(f"arithmetic-{split}").shuffle(pool)
    chosen = [pool[i % len(pool)] for i in range(n)]
    return [question(a, b, op) for a, b in chosen], [{"answer": str(result(a, b, op))} for a, b in chosen]


def policy_path(spec: ArithmeticSpec = ArithmeticSpec()) -> str:
    """Directory of the SFT arithmetic model (built on first use, about a minute on 2 cores)."""
    from rlhf.embedded.build import cached_model

    return cached_model(f"arithmetic-{spec.key()}", lambda out: _build(spec, out),
                        "building the arithmetic model (one time, about a minute on 2 cores)")


class TargetNotReached(RuntimeError):
    """The SFT build ran out of its step budget outside its accuracy band."""


def _build(spec: ArithmeticSpec, out: Path) -> None:
    import torch

    from rlhf.embedded.chat_models import build_tokenizer, chat_model

    tokenizer = build_tokenizer("qwen2", digits=True)
    model = chat_model("qwen2", tokenizer, hidden=spec.hidden, layers=spec.layers, seed=spec.seed)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def encode(a: int, b: int) -> tuple[list[int], list[int]]:
        head = tokenizer.apply_chat_template(question(a, b), add_generation_prompt=True, tokenize=False)
        q = tokenizer(head, add_special_tokens=False)["input_ids"]
        return q, tokenizer(str(a + b), add_special_tokens=False)["input_ids"] + [end]

    pool = problems("train")
    random.Random(spec.seed).shuffle(pool)
    rows = [encode(a, b) for a, b in pool[: spec.sft_problems]]
    val = _batch([encode(a, b) for a, b in pool[-spec.validation :]], tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    scale = 1.0  # halved each time a check jumps over the band
    step, reached, history = 0, expected_accuracy(model, *val), []
    saved = _snapshot(model, opt, g, step)
    while not spec.target_low <= reached <= spec.target_high:
        if step >= spec.max_steps:
            raise TargetNotReached(f"the arithmetic model's SFT reached an expected accuracy of {reached:.3f} after "
                                   f"{step} steps, outside [{spec.target_low}, {spec.target_high}]: {history[-5:]}")
        if reached > spec.target_high:  # over the band in one stretch: from the check before, smaller steps
            step = _restore(model, opt, g, saved)
            scale /= 2
        saved = _snapshot(model, opt, g, step)
        model.train()
        for _ in range(spec.check_every):
            step += 1
            for group in opt.param_groups:
                group["lr"] = spec.lr * scale * min(1.0, step / spec.warmup)
            ids, labels, mask = _batch([rows[i] for i in torch.randint(len(rows), (spec.sft_batch,), generator=g).tolist()],
                                       tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        reached = expected_accuracy(model, *val)
        history.append((step, round(reached, 3)))
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"task": "arithmetic", **asdict(spec), "reached": {"steps": step, "expected_accuracy": round(reached, 4),
                                                                   "lr_scale": scale}}
    (out / "built_by.json").write_text(json.dumps(record) + "\n")


def _batch(rows: list[tuple[list[int], list[int]]], pad: int):
    """Right-padded ids, labels (the answer and its end of turn; -100 elsewhere) and mask."""
    import torch

    width = max(len(q) + len(r) for q, r in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (q, r) in enumerate(rows):
        ids[i, : len(q) + len(r)] = torch.tensor(q + r)
        labels[i, len(q) : len(q) + len(r)] = torch.tensor(r)
        mask[i, : len(q) + len(r)] = 1
    return ids, labels, mask



def expected_accuracy(model, ids, labels, mask) -> float:
    """The mean over rows of P(a sample at temperature 1 is exactly the answer and its end of
    turn): exp of the summed log-probs of the label tokens, teacher-forced. Exact, no sampling
    noise; a lower bound of the sampled accuracy the verifiable reward sees (which also takes
    answers followed by more text)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        seq = (logp * (targets >= 0)).sum(1)
    return float(seq.exp().mean())


def _snapshot(model, opt, g, step: int) -> dict:
    import copy

    return {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()), "g": g.get_state(),
            "step": step}


def _restore(model, opt, g, saved: dict) -> int:
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    g.set_state(saved["g"])
    return saved["step"]
