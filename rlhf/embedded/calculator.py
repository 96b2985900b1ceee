"""The embedded tool user: the arithmetic model (`policy.path=arithmetic`) taught a calculator's
call format, `policy.path=calculator`.

The task is products of two numbers below 100 ("What is 37 * 45?", `data.prompts=products`),
which a model this small does not compute well on its own. A turn that calls the calculator is
`<calc>37*45</calc>`; the calculator (env=calculator) answers in a message of the `tool` role
with the result, and the model's next turn gives the answer. The build fine-tunes the SFT
arithmetic model further on demonstrations of both kinds, a share `tool_share` of them calls
and the rest direct answers, laid out as the episodes lay them out (the call, the tool's
message as the chat template writes it, the final answer; the loss on the model's turns
only). It trains until the model calls the calculator on some products and not on all (the
probability that a first turn starts a call, over validation products SFT never sees, inside
[`call_low`, `call_high`]) and, once it calls, writes the call and copies the tool's result
exactly with probability at least `quality` (teacher-forced, exact). RL then decides how
often to call: with the calculator's results and the verifiable reward, calling pays.

Built into the cache like the arithmetic model (`calculator-<key>`), deterministically.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.embedded import arithmetic

VERSION = 2  # 2: products (the model adds well on its own: a calculator for sums changed nothing)
CALL = "<calc>{a}*{b}</calc>"


@dataclass(frozen=True)
class CalculatorSpec:
    seed: int = 0
    problems: int = 2000  # training sums the demonstrations are made of
    tool_share: float = 0.3  # of the demonstrations, the share that call the calculator
    batch: int = 64
    lr: float = 3e-3  # after a linear warm-up of `warmup` steps
    warmup: int = 100
    call_low: float = 0.2  # the band of P(a first turn calls the calculator) the build stops in
    call_high: float = 0.5
    quality: float = 0.8  # and at least this P(the call and the answer after it are exactly right | a call)
    check_every: int = 10
    validation: int = 300
    max_steps: int = 2000

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"v": VERSION, "base": arithmetic.ArithmeticSpec().key(), **asdict(self)},
                                         sort_keys=True).encode()).hexdigest()[:12]


def policy_path(spec: CalculatorSpec = CalculatorSpec()) -> str:
    """Directory of the calculator-using model (built on first use, after the arithmetic model)."""
    from rlhf.embedded.build import cached_model

    return cached_model(f"calculator-{spec.key()}", lambda out: _build(spec, out),
                        "teaching the arithmetic model the calculator's calls (one time, about a minute on 2 cores)")


def demonstration(tokenizer, a: int, b: int, call: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """A demonstration's ids and the spans (start, end) of the model's own turns in them: the
    question, then the answer, or the call, the tool's message and the answer."""
    from rlhf.core.rollout.data import first_query, observation_ids

    end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    ids = first_query(tokenizer, arithmetic.question(a, b, "*"))
    spans = []
    if call:
        turn = tokenizer(CALL.format(a=a, b=b), add_special_tokens=False)["input_ids"] + [end]
        spans.append((len(ids), len(ids) + len(turn)))
        ids = ids + turn + observation_ids(tokenizer, str(a * b), "tool")
    answer = tokenizer(str(a * b), add_special_tokens=False)["input_ids"] + [end]
    spans.append((len(ids), len(ids) + len(answer)))
    return ids + answer, spans


def _build(spec: CalculatorSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = arithmetic.policy_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    pool = arithmetic.problems("train")
    random.Random(f"calculator-{spec.seed}").shuffle(pool)
    rng = random.Random(spec.seed)
    rows = [demonstration(tokenizer, a, b, rng.random() < spec.tool_share) for a, b in pool[: spec.problems]]
    val = _batch([demonstration(tokenizer, a, b, True) for a, b in pool[-spec.validation:]], tokenizer.pad_token_id)

    def check() -> tuple[float, float]:
        """(P(a first turn starts the call), P(the rest of the call and the answer after the tool's
        message are exactly right | it started)), means over the validation sums, teacher-forced."""
        ids, labels, mask, starts = val
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * (targets >= 0)
        first = logp[torch.arange(len(starts)), starts - 1]
        return float(first.exp().mean()), float((logp.sum(1) - first).exp().mean())

    g = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    step, (rate, quality), history = 0, check(), []
    while not (spec.call_low <= rate <= spec.call_high and quality >= spec.quality):
        if step >= spec.max_steps:
            raise arithmetic.TargetNotReached(
                f"the calculator build reached a call rate of {rate:.3f} (band [{spec.call_low}, {spec.call_high}]) and "
                f"a call quality of {quality:.3f} (at least {spec.quality}) after {step} steps: {history[-5:]}")
        model.train()
        for _ in range(spec.check_every):
            step += 1
            for group in opt.param_groups:
                group["lr"] = spec.lr * min(1.0, step / spec.warmup)
            ids, labels, mask, _ = _batch([rows[i] for i in torch.randint(len(rows), (spec.batch,), generator=g).tolist()],
                                          tokenizer.pad_token_id)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        rate, quality = check()
        history.append((step, round(rate, 3), round(quality, 3)))
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"task": "calculator", **asdict(spec),
              "reached": {"steps": step, "call_rate": round(rate, 4), "call_quality": round(quality, 4)}}
    (out / "built_by.json").write_text(json.dumps(record) + "\n")


def _batch(rows: list[tuple[list[int], list[tuple[int, int]]]], pad: int):
    """Right-padded ids, labels (the model's turns; -100 elsewhere), mask, and each row's first
    labelled position."""
    import torch

    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, spans) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        for s, e in spans:
            labels[i, s:e] = torch.tensor(row[s:e])
    return ids, labels, mask, torch.tensor([spans[0][0] for _, spans in rows])
