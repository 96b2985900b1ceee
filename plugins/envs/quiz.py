"""A multi-turn chat quiz on the embedded arithmetic model: the data's sum first ("What is
a + b?"), then follow-up sums in the same conversation, each turn rewarded 1 if its last
number is the sum's answer. The policy's turns and the quiz's questions are chat messages
(the model's template writes them), so an episode grows as the conversation does."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register

SUM = re.compile(r"What is (\d+) \+ (\d+)\?")
NUMBER = re.compile(r"-?\d+")


@register("env", "quiz")
class Quiz:
    """Sums asked one after another in one conversation; a reward for each right answer."""

    @dataclass
    class Config:
        turns: int = 3  # questions an episode asks: the data's sum, then follow-ups made from it

    def __init__(self, cfg: Config):
        require("env", [("env.turns", cfg.turns, cfg.turns >= 1, "at least 1")])
        self.cfg, self.max_turns = cfg, cfg.turns

    def make(self):
        return _quiz_env()(self.cfg.turns)


def follow_ups(a: int, b: int, turns: int) -> list[tuple[int, int]]:
    """The sums an episode asks: (a, b), then (b, a), then ((a + 1) % 100, b), ... (all below 100)."""
    out = [(a, b)]
    while len(out) < turns:
        x, y = out[-1]
        out.append((y, x) if len(out) % 2 else ((x + 1) % 100, y))
    return out


@functools.lru_cache(maxsize=None)
def _quiz_env():
    import gymnasium
    from gymnasium.spaces import Text

    class QuizEnv(gymnasium.Env):
        """One conversation of the quiz."""

        def __init__(self, turns: int):
            self.turns, self.sums, self.turn = turns, [], 0
            self.observation_space, self.action_space = Text(max_length=256), Text(max_length=256)

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            m = SUM.search(str((options or {}).get("prompt", "")))
            if m is None:
                raise ValueError("env=quiz asks sums: its prompts are data.prompts=arithmetic (\"What is a + b?\")")
            self.sums, self.turn = follow_ups(int(m.group(1)), int(m.group(2)), self.turns), 0
            a, b = self.sums[0]
            return [{"role": "user", "content": f"What is {a} + {b}?"}], {}

        def step(self, action: str):
            a, b = self.sums[self.turn]
            numbers = NUMBER.findall(action)
            reward = float(bool(numbers) and int(numbers[-1]) == a + b)
            self.turn += 1
            if self.turn >= self.turns:
                return "", reward, True, False, {}
            a, b = self.sums[self.turn]
            return f"What is {a} + {b}?", reward, False, False, {}

    return QuizEnv
