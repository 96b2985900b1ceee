"""The episode toy: an environment that answers the policy's move at random, small enough that
the optimum of the KL-regularised objective over whole episodes is computed exactly.

An episode starts from the data's prompt (x0, x1, ...). Each policy turn is a short response
(a move); unless it was the last turn, the environment answers with one of `answers` words
(x0, x1, ...), drawn from a distribution that depends on everything so far, the move
included; the reward comes at the end (or after every turn, `per_turn`). Every table (the
answers' probabilities, the rewards) is drawn once from `seed`, so the environment is a
known Markov decision process: `outcomes` lists, for a history and a move, each answer with
its probability and reward, which is what the soft-Bellman optimum needs
(`rlhf.core.evaluation.episode_optimum`).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from typing import Any

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register


@register("env", "dice")
class Dice:
    """The episode toy: random answers from a known distribution, an exact soft-Bellman optimum."""

    @dataclass
    class Config:
        turns: int = 2  # policy turns an episode has
        answers: int = 2  # words the environment answers with (x0, x1, ...)
        seed: int = 0  # draws every table: the answers' probabilities and the rewards
        reward_scale: float = 0.5  # standard deviation of a reward
        spread: float = 2.0  # standard deviation of an answer's logit: how much the move sways the dice
        per_turn: bool = False  # a reward after every turn (else only at the end)
        # the gamble: + luck to the final reward if the first answer is x0, - luck if not; a move whose
        # answer is a coin toss is then worth more to the whole-episode tilt than to the optimum
        luck: float = 1.5

    def __init__(self, cfg: Config):
        require("env", [("env.turns", cfg.turns, cfg.turns >= 1, "at least 1"),
                        ("env.answers", cfg.answers, cfg.answers >= 1, "at least 1"),
                        ("env.reward_scale", cfg.reward_scale, cfg.reward_scale > 0, "> 0")])
        self.cfg = cfg
        self.max_turns = cfg.turns

    def make(self):
        return _dice_env()(self)

    # the known MDP: what the optimum is computed from
    def _gauss(self, *key: Any) -> float:
        return random.Random(f"dice-{self.cfg.seed}-{key!r}").gauss(0.0, 1.0)

    def reward(self, history: tuple[str, ...]) -> float:
        """The reward after the move that ends `history` (the prompt, then moves and answers)."""
        turn = (len(history) + 1) // 2  # the prompt, then (move, answer) pairs: a move is at an even length
        if not self.cfg.per_turn and turn < self.cfg.turns:
            return 0.0
        luck = 0.0
        if turn == self.cfg.turns and len(history) >= 3:  # the first answer's luck, at the end
            luck = self.cfg.luck if history[2] == "x0" else -self.cfg.luck
        return self.cfg.reward_scale * self._gauss("r", history) + luck

    def answer_probs(self, history: tuple[str, ...]) -> list[float]:
        """P(answer | history) after the move that ends `history`."""
        logits = [self.cfg.spread * self._gauss("o", history, a) for a in range(self.cfg.answers)]
        top = max(logits)
        w = [math.exp(x - top) for x in logits]
        return [x / sum(w) for x in w]

    def outcomes(self, history: tuple[str, ...], action: str) -> list[tuple[float, str | None, float, bool]]:
        """Each (probability, answer, reward, done) of `action` after `history` (answer None when done)."""
        h = (*history, action.strip())
        turn = (len(h) + 1) // 2  # moves so far, this one included
        r = self.reward(h)
        if turn >= self.cfg.turns:
            return [(1.0, None, r, True)]
        return [(p, f"x{a}", r, False) for a, p in enumerate(self.answer_probs(h))]


@functools.lru_cache(maxsize=None)
def _dice_env():
    """The Gymnasium text environment of one episode (made here: gymnasium loads when an episode does)."""
    import gymnasium
    from gymnasium.spaces import Text

    class DiceEnv(gymnasium.Env):
        """One episode of the dice toy."""

        def __init__(self, spec: Dice):
            self.spec_, self.history = spec, ()
            self.observation_space = Text(max_length=64)
            self.action_space = Text(max_length=64)

        def reset(self, seed: int | None = None, options: dict | None = None):
            super().reset(seed=seed)
            prompt = str((options or {}).get("prompt", "x0")).strip()
            self.history = (prompt,)
            return prompt, {}

        def step(self, action: str):
            outcomes = self.spec_.outcomes(self.history, action)
            u, total = float(self.np_random.random()), 0.0
            for p, answer, reward, done in outcomes:  # (the last one if rounding leaves u above the total)
                total += p
                if u < total:
                    break
            self.history = (*self.history, action.strip(), *([answer] if answer is not None else []))
            return (answer or ""), reward, done, False, {}

    return DiceEnv
