"""A calculator the policy calls: a turn that holds `<calc>expression</calc>` is a call, and the
calculator answers with the result in a message of the `tool` role (with a chat template, as
the template writes a tool's message); a turn without a call is the final answer, rewarded 1
when its last number is the task's answer. The calculator's tokens are context: the loss, the
KL and the entropy see the policy's turns only.

The expression is arithmetic on integers (`+ - *`, parentheses, unary minus), parsed, never
executed as code: anything else is answered with an error message (`info["error"]`, counted
in `episode/tool_errors`). `enabled=false` answers every call with "no calculator here", which
is the same model without the tool, for comparison. Its task is the data's (`data.prompts=products`
or `arithmetic` give the answer as a field; otherwise the prompt's "What is a * b?", +, -).
"""

from __future__ import annotations

import ast
import functools
import re
import warnings
from dataclasses import dataclass

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register

CALL = re.compile(r"<calc>(.*?)</calc>", re.S)
TASK = re.compile(r"What is (-?\d+) ([+*-]) (-?\d+)\?")
NUMBER = re.compile(r"-?\d+")
LIMIT = 10**12  # the largest magnitude the calculator computes with
MAX_CHARS = 256  # the longest expression env.max_chars may allow (Python's parser recurses on nesting)


@register("env", "calculator")
class Calculator:
    """A calculator tool: `<calc>a+b</calc>` answered with the result; reward for the final answer."""

    @dataclass
    class Config:
        turns: int = 3  # policy turns an episode may take: calls, then the answer (one cut there is truncated)
        enabled: bool = True  # false: every call is answered "no calculator here" (the model without the tool)
        max_chars: int = 64  # the longest expression the calculator reads

    role = "tool"

    def __init__(self, cfg: Config):
        require("env", [("env.turns", cfg.turns, cfg.turns >= 1, "at least 1"),
                        ("env.max_chars", cfg.max_chars, 1 <= cfg.max_chars <= MAX_CHARS,
                         f"1 to {MAX_CHARS} (a longer expression can exhaust the parser's recursion)")])
        self.cfg, self.max_turns = cfg, cfg.turns

    def make(self):
        return _calculator_env()(self.cfg)


class CalculatorError(ValueError):
    """An expression the calculator does not compute."""


def evaluate(expression: str, max_chars: int = 64) -> int:
    """The value of an integer expression of `+ - *`, parentheses and unary signs; anything
    else (names, calls, division, powers, numbers past LIMIT) is a CalculatorError."""
    text = expression.strip()
    if not text or len(text) > max_chars:
        raise CalculatorError(f"an expression of 1 to {max_chars} characters")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ("1if" is a SyntaxWarning before it is an error)
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # (a NUL byte is a ValueError on Python 3.10)
        raise CalculatorError("not an expression") from None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            out = node.value
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            out = value(node.operand) * (-1 if isinstance(node.op, ast.USub) else 1)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = value(node.left), value(node.right)
            out = a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        else:
            raise CalculatorError("only integers, + - * and parentheses")
        if abs(out) > LIMIT:
            raise CalculatorError("a number too large")
        return out

    return value(tree.body)


def task_answer(options: dict) -> int:
    """The episode's answer: the data's `answer` field (an integer, as text or a number), else
    what its prompt asks."""
    if options.get("answer") is not None:
        given = options["answer"]
        text = str(given).strip()
        if isinstance(given, bool) or not re.fullmatch(r"-?\d{1,30}", text):
            raise ValueError(f"env=calculator: the data's answer {given!r} is not an integer; its task's answers are "
                             "integers (data.prompts=products gives them)")
        return int(text)
    m = TASK.search(str(options.get("prompt", "")))
    if m is None:
        raise ValueError("env=calculator needs the task's answer: data.prompts=products (or arithmetic) gives it (an "
                         "`answer` field), or prompts that ask \"What is a * b?\" (or +, -)")
    return evaluate(m.group(1) + m.group(2) + m.group(3))


def same_integer(text: str, value: int) -> bool:
    """Whether a run of digits (with an optional minus) is `value`, without int() on the text."""
    sign, digits = ("-", text[1:]) if text.startswith("-") else ("", text)
    digits = digits.lstrip("0") or "0"
    return (sign + digits if digits != "0" else "0") == str(value)


@functools.lru_cache(maxsize=None)
def _calculator_env():
    import gymnasium
    from gymnasium.spaces import Text

    class CalculatorEnv(gymnasium.Env):
        """One task: calls answered by the calculator, then the final answer."""

        def __init__(self, cfg):
            self.cfg, self.answer = cfg, 0
            self.observation_space, self.action_space = Text(max_length=256), Text(max_length=256)

        def reset(self, seed=None, options=None):
            super().reset(seed=seed)
            options = options or {}
            self.answer, prompt = task_answer(options), str(options.get("prompt", ""))
            m = TASK.search(prompt)  # the question as the user's message (the prompt's text as it is otherwise)
            return ([{"role": "user", "content": m.group(0)}] if m else prompt), {}

        def step(self, action: str):
            call = CALL.search(action)
            if call is None:  # the final answer: its last number, compared as text (a 5,000-digit one is no int())
                numbers = NUMBER.findall(action)
                right = bool(numbers) and same_integer(numbers[-1], self.answer)
                return "", float(right), True, False, {}
            info = {"tool_call": True}
            if not self.cfg.enabled:
                info["error"] = "disabled"
                return "no calculator here", 0.0, False, False, info
            try:
                result = str(evaluate(call.group(1), self.cfg.max_chars))
            except CalculatorError as e:
                info["error"] = str(e)
                result = f"error: {e}"
            return result, 0.0, False, False, info

    return CalculatorEnv
