"""The four things a plugin can be. The core talks to plugins only through these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

    from rlhf.policy import Policy


@dataclass
class Rollout:
    """One batch of on-policy experience, collected by the core (`rlhf.rollout`).

    B = batch, T = response length (padded). Query tokens are left-padded in `input_ids`,
    responses right-padded; `mask` is 1 on real response tokens, EOS included.
    """

    input_ids: torch.Tensor  # (B, Q + T) query and response tokens
    attention_mask: torch.Tensor  # (B, Q + T)
    query_len: int  # Q, the padded query width
    mask: torch.Tensor  # (B, T) float, 1 on response tokens up to and including EOS
    logprobs: torch.Tensor  # (B, T) log pi_old(y_t | x, y_<t), temperature-scaled
    ref_logprobs: torch.Tensor  # (B, T) log pi_ref(y_t | x, y_<t), temperature-scaled
    values: torch.Tensor | None  # (B, T) V(s_t) from the value head, if the policy has one
    scores: torch.Tensor  # (B,) reward source's score of each full response
    queries: list[str]
    responses: list[str]


@dataclass
class PairBatch:
    """B preference pairs, collected by the core (`rlhf.preferences`).

    Rows [0, B) hold the chosen responses and rows [B, 2B) the rejected ones, row i and
    row i + B after the same query. Every response token lies at or after column Q:
    data pairs are query + response right-padded, sampled pairs a left-padded query and a
    right-padded response; either way `mask` marks the response tokens.
    """

    input_ids: torch.Tensor  # (2B, Q + T)
    attention_mask: torch.Tensor  # (2B, Q + T)
    query_len: int  # Q
    mask: torch.Tensor  # (2B, T) float, 1 on response tokens (EOS included), 0 on queries and padding
    ref_logps: torch.Tensor  # (2B,) sum over response tokens of log pi_ref
    queries: list[str]
    chosen: list[str]
    rejected: list[str]
    scores: torch.Tensor | None = None  # (2B,) reward source's scores, for online pairs
    preference: torch.Tensor | None = None  # (B,) P(chosen preferred), for soft Bradley-Terry labels


@runtime_checkable
class PolicyOptimizer(Protocol):
    """Holds a loss and an update rule; the core collects the batches and runs the loop."""

    needs_value_head: bool  # the core attaches a value head to the policy if True
    # what update() takes: "rollouts" (Rollout), "preference_pairs" (PairBatch from the
    # data's pairs) or "sampled_pairs" (PairBatch of two policy samples per prompt,
    # labelled by the reward source)
    consumes: str
    # optional: `samples_per_prompt = k` makes the core sample each prompt k times, side by
    # side in the rollout (RLOO and GRPO); train.batch_size then counts prompts.
    # `opt`, the torch optimizer made in setup(), is what train.lr_schedule=linear decays and
    # what checkpoints save. Any other state (an adaptive KL coefficient, a moving baseline)
    # goes through optional `state_dict() -> dict` and `load_state_dict(dict)` methods of
    # plain Python values, so a resumed run continues exactly.

    def setup(self, policy: Policy, temperature: float) -> None:
        """Called once before training: create the torch optimizer over trainable params."""

    def update(self, batch: Rollout | PairBatch) -> Mapping[str, float]:
        """Run the update on one batch; return scalar metrics (names are free-form)."""


@runtime_checkable
class RewardSource(Protocol):
    """Frozen judge of responses: never trained, no gradients."""

    def score(self, queries: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """Return one float score per (query, response), shape (B,)."""


@runtime_checkable
class QuerySampler(Protocol):
    """Turns prompts into queries and owns the generation settings."""

    temperature: float

    def sample(self, prompts: Sequence[list[int]], rng: Any) -> list[list[int]]:
        """Cut each tokenised prompt into a query (a list of token ids)."""

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (temperature, top_k, ...)."""

    def kl_bias_warnings(self) -> list[str]:
        """Settings that make samples differ from pi(.|x) / temperature, one line each."""


@dataclass
class RunInfo:
    """Where a run writes and how dashboards should name and group it."""

    run_dir: str
    name: str  # the run's command-line overrides (a sweep's runs differ in them), or its directory name
    group_dir: str  # the sweep directory for a job of a sweep, else the run directory


@runtime_checkable
class Logger(Protocol):
    """A metrics sink. `metrics.jsonl` and `summary.json` are written by the core always."""

    def start(self, run: RunInfo, config: Mapping[str, Any]) -> None: ...

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def finish(self, summary: Mapping[str, Any]) -> None: ...
