"""Extending the core without editing it: a plugin is checked against its Protocol when
built, and a new kind of batch is one source class, with no change to the loop."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf

from rlhf.contracts import registry
from rlhf.contracts.update import Loss, OptimConfig
from rlhf.core.loop.trainer import Trainer
from rlhf.core.rollout import sources
from rlhf.core.toolkit import numerics
from rlhf.core.toolkit.reductions import token_mean


@pytest.fixture
def scratch_registry():
    with registry.isolated():  # the plugins a test registers are gone after it
        yield


def test_an_optimizer_missing_protocol_members_is_refused_when_built_naming_them(scratch_registry):

    @registry.register("optimizer", "half_done")
    class HalfDone:  # what it may leave out (beta, state, a value head) it gets; `finish` it may not
        @dataclass
        class Config:
            lr: float = 1e-3  # learning rate

        consumes = "rollouts"

        def __init__(self, cfg):
            self.cfg = cfg

        def prepare(self, batch):
            return {}

        def loss(self, policy, batch, prepared, epoch):
            return None

    node = OmegaConf.create({"_target_": f"{HalfDone.__module__}.{HalfDone.__qualname__}"})
    with pytest.raises(registry.PluginError, match=r"optimizer plugin 'half_done' .* lacks finish, which the "
                                                   r"PolicyOptimizer protocol declares"):
        registry.instantiate("optimizer", node)
    # the optional members it left out are declared, with their defaults (rlhf.contracts.interfaces.OPTIONAL)
    assert HalfDone.beta is None and HalfDone.needs_value_head is False and HalfDone.samples_per_prompt == 1
    assert HalfDone.takes_importance_weights is True and HalfDone.detectors == () and HalfDone(None).state_dict() == {}


@dataclass
class PromptBatch:
    """A kind of batch the core does not know: the training prompts themselves."""

    input_ids: torch.Tensor  # (B, L) right-padded prompts
    attention_mask: torch.Tensor  # (B, L)


@sources.source("prompt_text")
class PromptText:
    def __init__(self, ctx: sources.SourceContext):
        self.policy, self.prompts, self.position = ctx.policy, ctx.prompts, 0

    @classmethod
    def from_context(cls, ctx):
        return cls(ctx)

    def next(self, batch_size):
        rows = [self.prompts[(self.position + i) % len(self.prompts)] for i in range(batch_size)]
        self.position += batch_size
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.policy.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        return PromptBatch(ids, mask)

    def head_metrics(self, batch):
        return {"train/prompt_tokens": float(batch.attention_mask.sum())}

    def problem(self, batch):
        return ""

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@registry.register("optimizer", "prompt_sft")
class PromptSFT:
    """Maximum likelihood on the prompts' own tokens (after the first): an objective the
    core's update loop steps on, whatever the kind of batch."""

    @dataclass
    class Config(OptimConfig):
        lr: float = 1e-2  # Adam learning rate

    needs_value_head = False
    consumes = "prompt_text"
    samples_per_prompt = 1
    beta = 0.0

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare(self, b: PromptBatch):
        return {}

    def loss(self, policy, b: PromptBatch, prepared, epoch):
        logits, _ = policy.forward(b.input_ids, b.attention_mask, 1, with_values=False)  # predicts tokens 1..
        logprobs = numerics.logprobs_of(logits, b.input_ids[:, 1:])
        nll = -token_mean(logprobs, b.attention_mask[:, 1:].float())
        return Loss(nll, {"loss/nll": nll.detach()})

    def finish(self, b: PromptBatch, prepared):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_new_kind_of_batch_is_one_source_class_and_the_loop_is_unchanged(tmp_path, embedded_dir):
    cfg = compose("optimizer=prompt_sft", "train.steps=6", "train.batch_size=4", "eval.every=100",
                  "data.n_train=16", "data.n_eval=4", "sampler.max_new_tokens=4", "checkpoint.every=3")
    t = Trainer(cfg, tmp_path)
    assert isinstance(t.source, PromptText) and "prompt_text" in sources.kinds()
    t.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss/nll" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all(r["train/prompt_tokens"] > 0 for r in train)
    assert train[-1]["loss/nll"] < train[0]["loss/nll"]  # it learns the prompts
    state = torch.load(tmp_path / "checkpoints" / "step_000006" / "state.pt", weights_only=True)
    assert state["source"] == {"position": 24}  # the source's own state is checkpointed


def test_an_unknown_kind_of_batch_is_refused_before_any_model_loads(tmp_path):
    @registry.register("optimizer", "wants_mystery")
    class WantsMystery(PromptSFT):
        consumes = "mystery_batches"

    with pytest.raises(ValueError, match=r"optimizer consumes 'mystery_batches'; the core provides \(.*'rollouts'"):
        Trainer(compose("optimizer=wants_mystery"), tmp_path)
