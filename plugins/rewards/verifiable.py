"""Verifiable rewards: a response checked against the reference answer its prompt carries.

The prompt data holds the answer (`answer_field`, "answer" by default: a prompt file's
field, or the embedded arithmetic task's); the core hands it over as a column. The answer
is pulled out of the response (`extract`) and compared (`match`):

- `numeric`: both read as numbers (commas, a trailing period, a leading +/$ allowed), equal
  within `tolerance`;
- `exact`: equal strings after stripping whitespace (and case, unless `case_sensitive`);
- `regex`: the reference answer is a regular expression the extracted text must fullmatch;
- `math`: mathematical equivalence through math-verify (LaTeX or plain expressions:
  1/2 = 0.5 = \\frac{1}{2}, (x+1)^2 = x^2+2x+1).

The reward is `correct` or `wrong`, plus `format_reward` when the whole response matches
`format` (a regular expression), the format reward of DeepSeek-R1-style recipes. With the
defaults a correct answer scores 1 and anything else 0, so `eval.pass_at_k` with its
threshold of 1 counts correct answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register

MATCHES = ("numeric", "exact", "regex", "math")
EXTRACTS = {
    "last_number": r"(-?\d[\d,]*(?:\.\d+)?)(?!.*\d)",  # the last number in the response
    "boxed": r"\\boxed\{((?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*)\}",  # LaTeX \boxed{...}, braces nested two deep
    "answer_tag": r"<answer>(.*?)</answer>",  # <answer>...</answer>
    "gsm8k": r"####\s*(.+?)\s*$",  # GSM8K's final line: #### 42
    "whole": r"(.*)",  # the whole response
}
NUMBER = re.compile(r"[+$]?(-?[\d,]*\.?\d+)\.?")


@register("reward", "verifiable")
class VerifiableReward:
    @dataclass
    class Config:
        answer_field: str = "answer"  # the prompt data's field holding the reference answer
        answer_extract: Optional[str] = None  # pull the reference out of that field too (e.g. gsm8k); null: all of it
        match: str = "numeric"  # numeric, exact, regex or math (see the module's docstring)
        extract: str = "last_number"  # last_number, boxed, answer_tag, gsm8k, whole, or a regex with one group
        tolerance: float = 1e-6  # numeric: |a - b| <= tolerance * max(1, |b|)
        case_sensitive: bool = False  # exact: compare case too
        correct: float = 1.0  # reward of a correct answer
        wrong: float = 0.0  # reward of a wrong or missing one
        format: Optional[str] = None  # a regex the whole response should fullmatch, e.g. '<answer>.*</answer>'
        format_reward: float = 0.0  # added when it does

    def __init__(self, cfg: Config):
        pattern = EXTRACTS.get(cfg.extract, cfg.extract)
        reference = EXTRACTS.get(cfg.answer_extract or "whole", cfg.answer_extract)
        require("verifiable", [
            ("reward.answer_extract", cfg.answer_extract, _compiles(reference) and re.compile(reference).groups >= 1,
             f"null, one of {', '.join(EXTRACTS)}, or a regular expression with one group"),
            ("reward.match", cfg.match, cfg.match in MATCHES, f"one of {', '.join(MATCHES)}"),
            ("reward.extract", cfg.extract, _compiles(pattern) and re.compile(pattern).groups >= 1,
             f"one of {', '.join(EXTRACTS)}, or a regular expression with one group"),
            ("reward.format", cfg.format, cfg.format is None or _compiles(cfg.format), "a regular expression"),
            ("reward.tolerance", cfg.tolerance, cfg.tolerance >= 0, ">= 0"),
        ])
        self.cfg = cfg
        self.extractor = re.compile(pattern, re.DOTALL)
        self.reference = re.compile(reference, re.DOTALL)
        self.formatter = re.compile(cfg.format, re.DOTALL) if cfg.format else None

    def score(self, queries: Sequence[str], responses: Sequence[str], **columns: Sequence[Any]) -> torch.Tensor:
        answers = columns.get(self.cfg.answer_field)
        if answers is None or any(a is None for a in answers):
            have = sorted(columns) or "none"
            raise ValueError(f"reward=verifiable needs each prompt's reference answer in the data field "
                             f"{self.cfg.answer_field!r} (the data's fields besides the prompt: {have}); give prompts "
                             "from a .jsonl file with that field (or set reward.answer_field)")
        c = self.cfg
        out = []
        for response, answer in zip(responses, answers):
            reference = _last(self.reference, str(answer))
            r = c.correct if reference is not None and self.is_correct(response, reference) else c.wrong
            if self.formatter is not None and self.formatter.fullmatch(response.strip()):
                r += c.format_reward
            out.append(r)
        return torch.tensor(out, dtype=torch.float32)

    def extracted(self, response: str) -> str | None:
        return _last(self.extractor, response)

    def is_correct(self, response: str, answer: str) -> bool:
        got = self.extracted(response)
        if got is None:
            return False
        c = self.cfg
        if c.match == "numeric":
            a, b = _number(got), _number(answer)
            return a is not None and b is not None and abs(a - b) <= c.tolerance * max(1.0, abs(b))
        if c.match == "exact":
            return got == answer.strip() if c.case_sensitive else got.lower() == answer.strip().lower()
        if c.match == "regex":
            return re.fullmatch(answer, got, re.DOTALL) is not None
        from math_verify import parse, verify

        def latex(t):  # math-verify reads LaTeX in delimiters
            return t if "$" in t or "\\(" in t else f"${t}$"
        return bool(verify(parse(latex(answer)), parse(latex(got))))


def _last(pattern: re.Pattern, text: str) -> str | None:
    """The last non-empty match of the pattern's group (a pattern that can match nothing,
    such as the whole text's (.*), also matches the empty end)."""
    found = [m.strip() for m in pattern.findall(text) if m.strip()]
    return found[-1] if found else None


def _number(text: str) -> float | None:
    m = NUMBER.fullmatch(text.strip().rstrip(".,"))
    if not m:
        return None
    try:
        return float(m.group(1).replace(",", ""))
    except ValueError:
        return None


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except re.error:
        return False
