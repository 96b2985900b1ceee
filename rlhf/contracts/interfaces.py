"""What a plugin can be (an optimizer, a reward source, a sampler, a proposal, a logger), the
batches the core hands them, what a proposal returns, the policy they may call, and the batch
sources that make those batches. The core talks to plugins only through these, and checks
every plugin it builds against its group's Protocol (`PROTOCOLS`) before using it.

A member a plugin may leave out is declared in OPTIONAL with the value it then has;
registration gives a plugin class the ones it lacks, so the core never asks `hasattr`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

    from rlhf.contracts.update import OptimConfig


@dataclass
class Rollout:
    """One batch of on-policy experience, collected by the core (`rlhf.core.rollout.sampling`).

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
    columns: dict[str, list] = field(default_factory=dict)  # the prompts' other data fields, per row (e.g. answer)
    # (B, T) log q(y_t | x, y_<t) under the proposal that drew the responses (its temperature, truncation,
    # mixing, its own older weights or kernels); None when q is the current policy (then it is `logprobs`)
    proposal_logprobs: torch.Tensor | None = None
    temperature: float = 1.0  # the sampling temperature: `logprobs` and a plugin's own log pi are taken at it
    # (B, T) importance weights pi / q of the tokens (optimizer.correction), set by the core for an optimizer
    # that takes them (PolicyOptimizer.takes_importance_weights) when q != pi; None: every weight 1
    is_weight: torch.Tensor | None = None
    # (B, T) log pi_old - log pi_ref of each token, 0 on padding: the rollout's KL to the reference, computed
    # once (every estimator, metric and penalty starts from it: rlhf.core.toolkit.numerics.kl_estimate)
    log_ratio: torch.Tensor = None  # type: ignore[assignment]
    # episodes (env=...): the rewards where they fell, (B, T), each turn's on its last policy token (and the
    # reward source's on the episode's last one); None for single-turn rollouts, whose score is on the last token.
    # `scores` is then each episode's total, `mask` 1 on the policy's tokens only (the environment's are context)
    token_scores: torch.Tensor | None = None
    episode_stats: dict[str, float] = field(default_factory=dict)  # episodes: turns, truncated, tool errors, ...

    def __post_init__(self) -> None:
        if self.log_ratio is None:
            self.log_ratio = self.logprobs - self.ref_logprobs

    @property
    def sampled_logprobs(self) -> torch.Tensor:
        """log q of each sampled token: the proposal's, or the policy's when it drew them."""
        return self.logprobs if self.proposal_logprobs is None else self.proposal_logprobs


@dataclass
class PairBatch:
    """B preference pairs, collected by the core (`rlhf.core.rollout.sources`).

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


@dataclass
class Generation:
    """Sampled responses after left-padded queries, as the core's sampling loop or a proposal
    returns them; log-probs and values when the sampler produced them on the way."""

    input_ids: torch.Tensor  # (B, Q + T)
    attention_mask: torch.Tensor  # (B, Q + T): queries' padding and everything after each first EOS are 0
    query_len: int  # Q
    mask: torch.Tensor  # (B, T) long, 1 on response tokens up to and including the first EOS
    logprobs: torch.Tensor | None = None  # (B, T) log pi(y_t | x, y_<t) at the given temperature
    values: torch.Tensor | None = None  # (B, T) value head on the state before each token
    # (B, T) log q(y_t | x, y_<t): the distribution that drew each token (its temperature, top-k, top-p and
    # uniform mixing included); a proposal that is not the policy must give it, else None
    sampled_logprobs: torch.Tensor | None = None


@dataclass(frozen=True)
class Sampling:
    """How a run samples, fixed once from its sampler: the generation settings and the
    temperature log pi of the samples is taken at."""

    temperature: float
    kwargs: Mapping[str, Any]  # temperature, top_k, top_p, max_new_tokens, ... (transformers' generate names)

    def generation_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)


@runtime_checkable
class TrainablePolicy(Protocol):
    """What a plugin may call of the policy (`rlhf.core.model.policy.Policy`): its log-probs,
    its trained weights, and what an engine of its own needs to mirror it."""

    model: Any  # the transformers model (under peft's wrapper when LoRA is on)
    tokenizer: Any
    device: torch.device
    eos_ids: Sequence[int]  # the tokens a response ends on (EOS, or the chat template's end of turn)
    context_length: int | None  # positions the model attends over, if its config says

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int,
                       temperature: float = 1.0, with_values: bool = True, with_entropy: bool = False) -> tuple:
        """(log pi(y_t | x, y_<t) (B, T), the value head's V(s_t) (B, T) or None, the entropy (B, T) or None)."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (adapters, value head), by name."""

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the trained tensors to `state` (a trainable_state())."""


# the batches an optimizer may consume (PolicyOptimizer.consumes), each made by a batch source
ROLLOUTS = "rollouts"  # Rollout
PREFERENCE_PAIRS = "preference_pairs"  # PairBatch from the data's pairs
SAMPLED_PAIRS = "sampled_pairs"  # PairBatch of two policy samples per prompt, labelled by the reward source


@runtime_checkable
class PolicyOptimizer(Protocol):
    """An objective: the core collects the batches and runs the update loop (`rlhf.core.loop.update`)."""

    # what the core feeds it: ROLLOUTS, PREFERENCE_PAIRS or SAMPLED_PAIRS
    consumes: str
    # its config: an rlhf.contracts.update.OptimConfig (lr, adam_eps, max_grad_norm; `update()` tells the
    # core how to step: a MinibatchConfig's epochs and minibatches, the correction), and its own fields
    cfg: OptimConfig
    # optional (OPTIONAL): needs_value_head (False), samples_per_prompt (1: rollouts sample each prompt
    # k times side by side, RLOO, GRPO, and train.batch_size counts prompts), beta (None: the KL
    # coefficient of the objective E[r] - beta KL(pi || pi_ref) it solves, which eval.kl_to_optimum
    # compares with; None for an objective without one), takes_importance_weights (True: its loss
    # applies Rollout.is_weight; False refuses optimizer.correction), detectors (()) and tiny_steps
    # (None): its diagnoses over the metrics only it logs (rlhf.core.evaluation.diagnosis)

    def prepare(self, batch: Rollout | PairBatch) -> dict[str, Any]:
        """What the loss needs from the whole batch, once, without gradients (advantages,
        returns): (B, T) and (B,) tensors are cut into the minibatches with the batch."""

    def loss(self, policy: TrainablePolicy, batch: Rollout | PairBatch, prepared: dict[str, Any], epoch: int) -> Any:
        """The loss of a batch or minibatch: an rlhf.core.loop.update.Loss (the scalar, reduced with
        token_mean or row_mean; named statistics; whether to skip it)."""

    def finish(self, batch: Rollout | PairBatch, prepared: dict[str, Any]) -> Mapping[str, float]:
        """Metrics after the update (and state to step: an adaptive KL coefficient)."""

    def state_dict(self) -> dict:
        """State beyond the torch optimizer's that a resumed run needs (an adaptive KL
        coefficient, a moving baseline), as plain Python values; {} when there is none."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""


@runtime_checkable
class RewardSource(Protocol):
    """Frozen judge of responses: never trained, no gradients."""

    def score(self, queries: Sequence[str], responses: Sequence[str], **columns: Sequence[Any]) -> torch.Tensor:
        """Return one float score per (query, response), shape (B,). When the prompt data has
        fields besides the prompt (a reference `answer`, ...), each comes as a keyword argument:
        a list with one value per row (None where a prompt lacks it), as TRL passes dataset
        columns to its reward functions. A source that needs none may leave **columns out."""


@runtime_checkable
class QuerySampler(Protocol):
    """Turns prompts into queries and owns the generation settings."""

    temperature: float

    def sample(self, prompts: Sequence[list[int]], rng: Any) -> list[list[int]]:
        """Cut each tokenised prompt into a query (a list of token ids)."""

    def generation_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (temperature, top_k, ...)."""

    def kl_bias(self) -> list[str]:
        """Its settings that make the responses differ from samples of pi(.|x) at the temperature,
        as `key=value` ("sampler.top_k=2"): the KL penalty and KL metrics are then biased."""

    # optional (OPTIONAL): longest_query (None: the longest query it cuts, in tokens, which with the
    # response cap must fit the model's context), notices (a method: other one-line warnings at the start)


@runtime_checkable
class Proposal(Protocol):
    """The distribution q a rollout's responses are drawn from: the current policy (the default),
    the policy some updates old, an exploring variant of it, another engine. It records log q
    of every token it draws; an optimizer corrects for q != pi with importance weights
    (`optimizer.correction`)."""

    is_policy: bool  # q is the current policy at the sampler's settings: log q = log pi, nothing to correct

    def sample(self, policy: TrainablePolicy, queries: Sequence[list[int]], sampling: Sampling, with_values: bool,
               rows: tuple[int, int] | None) -> Generation:
        """A Generation of the queries; unless is_policy, with `sampled_logprobs` (log q of each
        drawn token, under exactly the distribution that drew it). `rows`: these queries' place
        among every rank's (per-row random streams)."""

    def after_update(self, policy: TrainablePolicy) -> Mapping[str, float] | None:
        """Called after every update of the policy (a copy of older weights kept, an engine's weights
        synced); metrics it returns (the sync's seconds) join the step's."""

    # optional (OPTIONAL): start(policy, sampling), before the first step (an engine of its own is built
    # and refuses what it cannot do, in one line); state_dict() and load_state_dict(state) for a resume


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


@runtime_checkable
class SampleLogger(Protocol):
    """A logger that also shows each evaluation's samples (wandb as a table, TensorBoard as
    text); the loop sends them to every logger that has this method as well as the three above."""

    def log_samples(self, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """rows: {query, response, reward, kl, <judge>: score ...}, the samples saved at `step`."""


@runtime_checkable
class BatchSource(Protocol):
    """Feeds the optimizers that consume one kind of batch (their `consumes` names it).

    A source owns everything the loop must know about its batches: how to make the next
    one, the metrics that describe a batch before any update, and whether a batch is fit
    to train on. Sources live in `rlhf.core.rollout.sources`, one class per file.
    """

    def next(self, batch_size: int) -> Any:
        """The next batch of `batch_size` prompts or pairs (this rank's share of them)."""

    def head_metrics(self, batch: Any) -> dict[str, float]:
        """What the batch itself shows before the update (train/reward, train/kl, ...)."""

    def problem(self, batch: Any) -> str:
        """'' or why the batch must not be trained on (a non-finite score or KL), naming the row."""

    def state_dict(self) -> dict:
        """The data position (and caches) a resumed run needs to continue exactly."""

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Environment(Protocol):
    """What a run's episodes are played in (the `env` group): a policy turn, the environment's
    (or a tool's) answer, another turn, rewards per turn or at the end. The plugin makes the
    environments; each is Gymnasium's `Env` for text:

        reset(seed=None, options=None) -> (observation, info)
        step(action) -> (observation, reward, terminated, truncated, info)

    The first observation is the query (text, or a list of chat messages); `options["prompt"]`
    is the data's prompt for the episode, which the environment may take as its task. An
    action is the text of the policy's turn; an observation the text the environment answers
    with, appended to the episode as tokens once (`rlhf.core.rollout.episodes`)."""

    def make(self) -> Any:
        """A fresh environment (one an episode)."""

    # optional (OPTIONAL): max_turns (the most policy turns an episode has; one cut there is truncated),
    # role (the chat role the answers take with a chat template: "user", or "tool" for a tool's results)


# The Protocol every plugin of a group must satisfy; checked when the core builds one.
PROTOCOLS: dict[str, type] = {
    "optimizer": PolicyOptimizer, "reward": RewardSource, "sampler": QuerySampler, "logger": Logger, "proposal": Proposal,
    "env": Environment,
}


def _no_state(self: Any) -> dict:
    return {}


def _nothing(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


def _no_notices(self: Any) -> list[str]:
    return []


# The members a plugin of a group may leave out, and the value it then has: registration
# (`rlhf.contracts.registry.register`) gives the class each one it does not define.
OPTIONAL: dict[str, dict[str, Any]] = {
    "optimizer": {"needs_value_head": False, "samples_per_prompt": 1, "beta": None, "takes_importance_weights": True,
                  "detectors": (), "tiny_steps": None, "state_dict": _no_state, "load_state_dict": _nothing},
    "sampler": {"longest_query": None, "notices": _no_notices},
    "proposal": {"start": _nothing, "state_dict": _no_state, "load_state_dict": _nothing},
    "env": {"max_turns": 4, "role": "user"},
}
