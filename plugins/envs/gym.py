"""Any Gymnasium environment whose observations and actions are text, by its registered id:
`env=gym env.id=<id> env.kwargs={...}` (the module that registers it named in
`env.module`, imported first, as `gymnasium.make("module:id")` does). The episode's first
observation is what `reset` returns; each policy turn is the action `step` is given."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register


@register("env", "gym")
class Gym:
    """A Gymnasium text environment by its registered id."""

    @dataclass
    class Config:
        id: str = "???"  # the environment's registered id, e.g. MyTextGame-v0
        module: Optional[str] = None  # a module to import first, which registers the id (a package of yours)
        kwargs: Dict[str, Any] = field(default_factory=dict)  # keyword arguments of gymnasium.make
        max_turns: int = 4  # policy turns an episode has at most (cut there: truncated)
        role: str = "user"  # the chat role its answers take with a chat template: user, or tool

    def __init__(self, cfg: Config):
        require("env", [("env.max_turns", cfg.max_turns, cfg.max_turns >= 1, "at least 1"),
                        ("env.role", cfg.role, cfg.role in ("user", "tool"), "user or tool")])
        self.cfg, self.max_turns, self.role = cfg, cfg.max_turns, cfg.role

    def make(self) -> Any:
        import gymnasium

        if self.cfg.module:
            try:
                importlib.import_module(self.cfg.module)
            except ImportError as e:
                raise ValueError(f"env.module={self.cfg.module}: cannot import it ({e})") from None
        try:
            env = gymnasium.make(self.cfg.id, **dict(self.cfg.kwargs))
        except gymnasium.error.Error as e:
            raise ValueError(f"env.id={self.cfg.id}: {e}") from None
        return env.unwrapped if hasattr(env, "unwrapped") else env
