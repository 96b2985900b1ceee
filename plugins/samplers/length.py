"""LengthSampler: each query is a prompt's first n tokens, n drawn from [min, max); optionally
each batch's response length cap drawn from a range too (the course's output LengthSampler).

A response cut at a drawn length is a prefix of a sample of pi, not a sample that ends there:
its tokens are samples of pi (the per-token KL is exact for them), but the reward scores a
cut text as if it were whole, and no response longer than the draw is ever scored. The
objective is then an average over lengths, not E[r] - beta KL over whole responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from rlhf.contracts.checks import require
from rlhf.contracts.registry import register


@register("sampler", "length")
class LengthSampler:
    @dataclass
    class Config:
        min_query_tokens: int = 2  # shortest query (inclusive)
        max_query_tokens: int = 8  # longest query (exclusive)
        temperature: float = 1.0  # sampling temperature; log-probs use the same scaled logits
        top_k: int = 0  # 0: off. >0 samples from a truncated pi: KL estimates are biased
        top_p: float = 1.0  # 1: off. <1 samples from a truncated pi: KL estimates are biased
        num_beams: int = 1  # >1: beam search, not samples from pi
        repetition_penalty: float = 1.0  # 1: off. Changes the sampling distribution
        min_new_tokens: int = 0  # >0 forbids EOS early: samples no longer from pi
        max_new_tokens: int = 24  # response length cap
        # 0: off. >0: each batch's cap drawn uniformly from [min_response_tokens, max_new_tokens]
        # (evaluation draws with its own fixed seed, the same length every time); cut responses are not
        # samples of pi that end there (see the module's docstring)
        min_response_tokens: int = 0
        do_sample: bool = True  # false: greedy decoding

    def __init__(self, cfg: Config):
        require("sampler", [(f"sampler.{k}", getattr(cfg, k), ok, want) for k, ok, want in (
            ("min_query_tokens", 1 <= cfg.min_query_tokens < cfg.max_query_tokens,
             f"in [1, max_query_tokens={cfg.max_query_tokens})"),
            ("temperature", cfg.temperature > 0, "> 0"),
            ("top_k", cfg.top_k >= 0, ">= 0; 0 is off"),
            ("top_p", 0 < cfg.top_p <= 1, "in (0, 1]; 1 is off"),
            ("num_beams", cfg.num_beams >= 1, ">= 1"),
            ("repetition_penalty", cfg.repetition_penalty > 0, "> 0; 1 is off"),
            ("max_new_tokens", cfg.max_new_tokens >= 1, ">= 1"),
            ("min_new_tokens", 0 <= cfg.min_new_tokens <= cfg.max_new_tokens, f"in [0, max_new_tokens={cfg.max_new_tokens}]"),
            ("min_response_tokens", 0 <= cfg.min_response_tokens <= cfg.max_new_tokens,
             f"in [0, max_new_tokens={cfg.max_new_tokens}]; 0 is off"),
        )])
        self.cfg = cfg
        self.temperature = cfg.temperature
        self.response_cap = cfg.max_new_tokens  # this batch's cap: drawn in sample() when min_response_tokens > 0

    def sample(self, prompts: Sequence[list[int]], rng: Any) -> list[list[int]]:
        c = self.cfg
        queries = [p[: rng.randrange(c.min_query_tokens, c.max_query_tokens)] or p[:1] for p in prompts]
        if c.min_response_tokens:  # after the queries' draws: with the option off, the stream is unchanged
            self.response_cap = rng.randint(c.min_response_tokens, c.max_new_tokens)
        return queries

    def generation_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return dict(
            do_sample=c.do_sample, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
            num_beams=c.num_beams, repetition_penalty=c.repetition_penalty,
            min_new_tokens=c.min_new_tokens, max_new_tokens=self.response_cap,
        )

    @property
    def longest_query(self) -> int:
        return self.cfg.max_query_tokens - 1  # (a query's length is drawn from [min, max))

    def kl_bias(self) -> list[str]:
        c = self.cfg
        biased = {"top_k": c.top_k > 0, "top_p": c.top_p < 1, "min_new_tokens": c.min_new_tokens > 0,
                  "num_beams": c.num_beams > 1, "repetition_penalty": c.repetition_penalty != 1.0,
                  "do_sample": not c.do_sample}
        return [f"sampler.{name}={getattr(c, name)}" for name, on in biased.items() if on]

    def notices(self) -> list[str]:
        c = self.cfg
        return [f"sampler.min_response_tokens={c.min_response_tokens}: responses cut at a drawn length are prefixes of "
                "samples of pi, not samples that end there; the reward scores a cut text as if whole, so the objective "
                "is not E[r] - beta KL over whole responses"] if c.min_response_tokens else []
