"""A reward over whole responses for the sequence toy problems: per-token values plus
patterns of the whole response, so that a greedy token-by-token choice can be wrong.

r(x, y) = sum over y's tokens of `per_token[token]` (`other` for a token not listed there,
such as a prompt token) + the value of every pattern in
`patterns[x]` (and in `patterns["*"]`, for every prompt) that the whole response matches.
Patterns are shell-style (fnmatch) over the space-separated tokens: "y1 *" starts with y1,
"* y3" ends with y3, "y1*y3" both (and "y1 y3"), "" is the empty response (EOS at once), "* * *" has
three tokens or more (for a cap of 3: cut at the cap, not stopped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Dict, Sequence

import torch

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register


def _per_token() -> Dict[str, float]:
    # y0 is the decoy: the best token on its own, in no bonus
    return {"y0": 0.3, "y1": -0.2, "y2": 0.0, "y3": 0.1}


def _patterns() -> Dict[str, Dict[str, float]]:
    return {
        # x0: an early y1 (a cost now) pays only if the response also ends with y3: credit over two steps
        "x0": {"y1*y3": 1.5},
        # x1: stopping right after one y2 beats running on with the decoy
        "x1": {"y2": 1.2},
        # x2: the decoy wins, but a response that runs into the cap is penalised: when to stop
        "x2": {"* * *": -0.5},
    }


@register("reward", "sequence")
class SequenceReward:
    @dataclass
    class Config:
        per_token: Dict[str, float] = field(default_factory=_per_token)  # each occurrence of a token adds its value
        other: float = -0.3  # each occurrence of a token not in per_token (a prompt token in a response)
        patterns: Dict[str, Dict[str, float]] = field(default_factory=_patterns)  # prompt (or "*") -> pattern -> value
        unknown_prompt: str = "error"  # error: a prompt with no patterns row is refused; zero: it gets none

    def __init__(self, cfg: Config):
        require("sequence", [("reward.unknown_prompt", cfg.unknown_prompt, cfg.unknown_prompt in ("error", "zero"),
                              "error or zero")])
        self.cfg = cfg

    def score(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        c = self.cfg
        out = []
        for q, r in zip(queries, responses):
            x, tokens = q.strip(), r.split()
            if x not in c.patterns and c.unknown_prompt == "error":
                raise ValueError(f"reward=sequence: prompt {x!r} has no row in reward.patterns ({sorted(c.patterns)}); "
                                 "add one, or set reward.unknown_prompt=zero")
            text = " ".join(tokens)
            rules = {**c.patterns.get("*", {}), **c.patterns.get(x, {})}
            out.append(sum(c.per_token.get(t, c.other) for t in tokens)
                       + sum(v for p, v in rules.items() if fnmatchcase(text, p)))
        return torch.tensor(out, dtype=torch.float32)
