"""Episodes (rlhf/core/rollout/episodes.py, rlhf/core/evaluation/episode_optimum.py): the ids
sampled are the ids trained on, with a chat template that rewrites history; the environment's
tokens carry no gradient and count in no token mean; advantages run across turns over the
policy's tokens; the soft-Bellman optimum is the objective's maximum, above the optimistic
whole-episode tilt; the single-turn path is untouched."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import compose

from rlhf.contracts.interfaces import Sampling
from rlhf.core.loop.trainer import Trainer
from rlhf.core.rollout import data, episodes
from rlhf.core.toolkit import numerics

TOY = ["+experiment=episode_toy", "train.steps=1", "train.batch_size=16", "data.n_eval=3", "eval.every=100"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return Trainer(compose(*TOY), tmp_path_factory.mktemp("toy"))


def test_an_episode_is_the_policys_turns_and_the_environments_answers(toy):
    r = toy.next_batch(16)
    # two one-token moves with one one-token answer between them: policy, environment, policy
    assert r.mask.shape[1] == 3 and torch.equal(r.mask, torch.tensor([[1.0, 0.0, 1.0]]).expand(16, 3))
    answers = {toy.policy.tokenizer.decode([int(t)]) for t in r.input_ids[:, r.query_len + 1]}
    assert answers <= {"x0", "x1"}  # the environment's words, appended as tokens
    assert r.token_scores is not None and torch.equal(r.token_scores[:, :2], torch.zeros(16, 2))  # at the end only
    assert torch.allclose(r.scores, r.token_scores.sum(1))
    assert r.episode_stats["episode/turns"] == 2 and r.episode_stats["episode/truncated"] == 0


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, embedded_dir) -> str:
    """A Qwen2-layout chat model (ChatML, <|im_end|> ends a turn), random weights, built here."""
    from rlhf.embedded.chat_models import build_chat_model

    out = tmp_path_factory.mktemp("qwen2")
    build_chat_model("qwen2", out)
    return str(out)


def test_the_trained_ids_are_the_sampled_ids_with_a_template_that_rewrites_history(chat_model, monkeypatch):
    """A chat model whose template drops earlier turns' reasoning (as reasoning models' do): the
    episode's ids are the sampler's own at every policy position, the answers are the template's
    tokens for a new message, written once; rendering the conversation again would have changed
    them, which the drift metric counts."""
    from rlhf.contracts.schema import LoraSettings, PolicyConfig
    from rlhf.core.model.policy import Policy

    policy = Policy.load(PolicyConfig(path=chat_model, lora=LoraSettings(enabled=False)),
                         torch.device("cpu"))
    tok = policy.tokenizer
    tok.chat_template = (  # ChatML that keeps only what follows </think> of every assistant turn but the last
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    class Echo:  # answers every turn with a fixed tool result, for three turns
        max_turns, role = 3, "tool"

        def make(self):
            class E:
                def reset(self, seed=None, options=None):
                    return [{"role": "user", "content": "a movie review, please"}], {}

                def step(self, action):
                    return "result: 42", 0.5, False, False, {}

            return E()

    drawn = []
    real = episodes.generate

    def recording(*args, **kwargs):
        g = real(*args, **kwargs)
        drawn.append([g.input_ids[j, g.query_len:][g.mask[j].bool()].tolist() for j in range(len(g.input_ids))])
        return g

    monkeypatch.setattr(episodes, "generate", recording)
    torch.manual_seed(0)
    gen = {"max_new_tokens": 6, "temperature": 1.0}
    r = episodes.play(policy, _Zero(), Echo(), [[1, 2]] * 3, Sampling(1.0, gen), with_values=False)
    trained = [[int(t) for t, m in zip(r.input_ids[i, r.query_len:], r.mask[i]) if m] for i in range(3)]
    assert trained == [sum((turn[i] for turn in drawn if i < len(turn)), []) for i in range(3)]
    answer = data.observation_ids(tok, "result: 42", "tool")
    body = r.input_ids[0, r.query_len:].tolist()
    assert body[len(drawn[0][0]) : len(drawn[0][0]) + len(answer)] == answer  # the tool's message, as the template writes it
    assert r.episode_stats["episode/turns"] == 3 and r.episode_stats["episode/truncated"] == 1  # cut by the turn limit
    assert "episode/retokenize_drift" in r.episode_stats


class _Zero:
    def score(self, queries, responses):
        return torch.zeros(len(responses))


@pytest.mark.parametrize("optimizer", ["ppo", "a2c", "reinforce", "rloo", "grpo", "dm"])
def test_no_gradient_flows_through_an_environments_token(optimizer, tmp_path, monkeypatch):
    """The loss of every optimizer that takes episodes, differentiated by the log-probabilities
    the policy gives each token: exactly 0 on the environment's tokens."""
    t = Trainer(compose(*TOY, f"optimizer={optimizer}"), tmp_path)
    batch = t.next_batch(8)
    leaf = {}
    real = t.policy.token_logprobs

    def watched(*args, **kwargs):
        logprobs, values, entropy = real(*args, **kwargs)
        leaf["x"] = logprobs
        logprobs.retain_grad()
        return logprobs, values, entropy

    monkeypatch.setattr(t.policy, "token_logprobs", watched)
    prepared = t.optimizer.prepare(batch)
    t.optimizer.loss(t.policy, batch, prepared, 0).loss.backward()
    grad = leaf["x"].grad
    env_tokens = batch.mask == 0
    assert env_tokens.any() and torch.equal(grad[env_tokens], torch.zeros_like(grad[env_tokens]))
    assert grad[~env_tokens].abs().sum() > 0  # (the policy's tokens do get one)


def test_a_token_mean_counts_the_policys_tokens_only():
    from rlhf.core.toolkit.reductions import token_mean

    x = torch.tensor([[1.0, 100.0, 3.0], [2.0, 100.0, 4.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])  # the middle column is the environment's
    assert token_mean(x, mask).item() == pytest.approx((1 + 3 + 2 + 4) / 4)


def test_advantages_run_across_turns_over_the_policys_tokens_only():
    """GAE over an episode with the environment's tokens between the turns equals GAE over the
    policy's tokens laid end to end: an answer is no step, and the first turn's last token
    bootstraps from the second turn's first value, not from the answer's."""
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 9.0, 0.5, 0.7]])  # 9.0: a value at the environment's token, never used
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    a, ret = numerics.over_policy_tokens(numerics.gae, rewards, values, mask, 1.0, 0.9)
    a2, ret2 = numerics.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.7]]), torch.ones(1, 3), 1.0, 0.9)
    assert torch.allclose(a[0, [0, 2, 3]], a2[0]) and a[0, 1] == 0 and torch.allclose(ret[0, [0, 2, 3]], ret2[0])
    # by hand: deltas 0 + 0.5 - 0.2 = 0.3, 0 + 0.7 - 0.5 = 0.2, 1 - 0.7 = 0.3; A = 0.3 + 0.9 (0.2 + 0.9 0.3)
    assert a[0, 0].item() == pytest.approx(0.3 + 0.9 * (0.2 + 0.9 * 0.3))
    # without gaps (a single turn) the same function is gae itself, to the bit
    m = torch.ones(1, 4)
    assert torch.equal(numerics.over_policy_tokens(numerics.gae, rewards, values, m, 1.0, 0.9)[0],
                       numerics.gae(rewards, values, m, 1.0, 0.9)[0])


def _objective(node, kind: str, beta: float) -> float:
    """E[sum of rewards] - beta E[sum_t KL(pi(.|s_t) || pi_ref(.|s_t))] of the policy `kind`
    (star, tilt, ref) at this decision point, by walking the tree forward (not the recursion
    that solved it)."""
    log_p = {"star": node.log_star, "tilt": node.log_tilt, "ref": node.log_ref}[kind]
    p = log_p.exp()
    kl = float((p * (log_p - node.log_ref)).sum())
    value = 0.0
    for pa, branch in zip(p.tolist(), node.branches):
        value += pa * sum(po * (r + (_objective(child, kind, beta) if child else 0.0)) for po, _, r, child in branch)
    return value - beta * kl


def test_the_soft_bellman_policy_is_the_objectives_maximum_and_the_tilt_is_not(toy):
    from rlhf.core.evaluation.episode_optimum import episode_optimum

    beta = toy.optimizer.beta
    roots = episode_optimum(toy.policy, toy.env, toy.eval_prompts, beta, toy.sampling.generation_kwargs(),
                            toy.sampling.temperature)
    assert len(roots) == 3
    for root in roots:
        star, tilt, ref = (_objective(root, k, beta) for k in ("star", "tilt", "ref"))
        assert star == pytest.approx(root.v, abs=1e-9)  # V*(s) is the objective at pi*
        assert star >= tilt - 1e-12 and star > ref
        assert root.v_tilt >= root.v - 1e-12  # the tilt's own value is optimistic (Jensen)
    assert sum(_objective(r, "star", beta) - _objective(r, "tilt", beta) for r in roots) > 1e-3  # and they differ here
    # at initialisation pi is pi_ref: its expected KL to pi* is the KL of pi_ref to pi*, > 0
    assert all(r.kl > 0.1 and math.isfinite(r.kl_tilt) for r in roots)


def test_the_single_turn_path_has_no_episode_fields(tmp_path):
    t = Trainer(compose("+experiment=toy_bandit", "train.steps=1", "train.batch_size=8", "data.n_eval=4"), tmp_path)
    r = t.next_batch(8)
    assert t.env is None and r.token_scores is None and r.episode_stats == {}


def test_rlhf_generate_plays_an_episode_with_you_as_the_environment(tmp_path, embedded_dir):
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("rlhf-generate")
    r = subprocess.run([str(exe), "embedded", "The movie was", "--episode", "--max-new-tokens", "6"], input="And then\n\n\n",
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    turns = [x for x in r.stdout.splitlines() if x.startswith("policy: ")]
    assert len(turns) == 2 and r.stderr.count("env> ") == 2, (r.stdout, r.stderr)


def test_a_minibatch_of_episodes_keeps_every_policy_token(toy):
    """(The minibatch's trimming once cut an episode at its count of policy tokens, dropping the
    last turn: PPO and GRPO trained on half an episode.)"""
    from rlhf.core.rollout import collect

    r = toy.next_batch(16)
    idx = torch.arange(0, 16, 2)
    mb, _ = collect.minibatch(r, idx)
    assert torch.equal(mb.mask, r.mask[idx]) and torch.equal(mb.token_scores, r.token_scores[idx])


def test_the_calculator_computes_integer_arithmetic_and_nothing_else():
    from rlhf_plugins.envs.calculator import Calculator, CalculatorError, evaluate, same_integer

    assert evaluate("37*45") == 1665 and evaluate(" -(3 + 4) * 2 ") == -14 and evaluate("+5-7") == -2
    for bad in ["__import__('os').system('true')", "2**99", "7/2", "x+1", "1e3", "True+1", "(1).real", "9" * 13,
                "999999*9999999", "", "1+" * 40 + "1", "[1][0]", "1;2", "1\x00", "1if"]:
        with pytest.raises(CalculatorError):
            evaluate(bad)
    with pytest.raises(ValueError, match=r"env.max_chars=10000 \(must be 1 to 256"):  # (the parser recurses on nesting)
        Calculator(Calculator.Config(max_chars=10_000))
    # a final answer is compared as text: a run of 5,000 digits is no int() (Python refuses past 4,300)
    assert same_integer("0042", 42) and not same_integer("9" * 5000, 42)


CALCULATOR = ["+experiment=calculator", "train.batch_size=8", "data.n_eval=48", "eval.samples=4"]


def test_a_call_is_answered_by_the_tool_as_context_and_counted(tmp_path):
    """The embedded tool user's episodes: a call, the calculator's message (the template's `tool`
    turn, mask 0), the answer; calls and errors counted; without the tool a call is an error."""
    t = Trainer(compose(*CALCULATOR, "train.steps=1"), tmp_path / "on")
    tok = t.policy.tokenizer
    r = t.next_batch(8)
    called = [i for i, text in enumerate(r.responses) if "<calc>" in text]
    assert called and r.episode_stats["episode/tool_calls"] == len(called) / len(r.responses)
    for i in called:
        body, policy, real = r.input_ids[i, r.query_len:], r.mask[i] == 1, r.attention_mask[i, r.query_len:] == 1
        tool = tok.decode(body[real & ~policy])
        a, b = map(int, re.search(r"What is (\d+) \* (\d+)\?", r.queries[i]).groups())
        assert tool.startswith("\n<|im_start|>tool\n") and f"\n{a * b}<|im_end|>" in tool, tool  # masked out
        assert "<calc>" in tok.decode(body[policy]) and "tool" not in tok.decode(body[policy])
    assert r.episode_stats["episode/tool_errors"] == 0
    off = Trainer(compose(*CALCULATOR, "train.steps=1", "env.enabled=false"), tmp_path / "off")
    r = off.next_batch(8)
    assert r.episode_stats["episode/tool_errors"] == r.episode_stats["episode/tool_calls"] > 0


def test_rl_with_the_calculator_beats_the_same_model_without_it(tmp_path):
    """The issue's claim at a small scale: 30 GRPO steps with the calculator raise held-out
    accuracy on products well above the same model and RL without the tool, by calling it."""
    with_tool = Trainer(compose(*CALCULATOR, "train.steps=30", "eval.every=30"), tmp_path / "on").fit()
    without = Trainer(compose(*CALCULATOR, "train.steps=30", "eval.every=30", "env.enabled=false"),
                      tmp_path / "off").fit()
    assert with_tool["reward_end"] > with_tool["reward_start"] + 0.2, with_tool
    assert with_tool["reward_end"] > without["reward_end"] + 0.4, (with_tool, without)
    assert with_tool["tool_calls_end"] > 0.8 and with_tool["tool_errors_end"] < 0.05, with_tool
