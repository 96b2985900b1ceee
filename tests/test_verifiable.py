"""Verifiable rewards: answers checked against the prompt data's reference, rewards combined
with weights, the unbiased pass@k, and RL raising held-out accuracy on the embedded
arithmetic task."""

from __future__ import annotations

import json
from math import comb
from pathlib import Path

import pytest
import torch
from conftest import cli

from rlhf.contracts import registry
from rlhf.core.evaluation.held_out import pass_at_k_estimate
from rlhf.core.rollout.collect import score

CPU = torch.device("cpu")


def _reward(name: str, **fields):
    from omegaconf import OmegaConf

    target = next(p.target for p in registry.plugins("reward") if p.name == name)
    return registry.instantiate("reward", OmegaConf.create({"_target_": target, **fields}))


@pytest.mark.parametrize("fields,response,answer,expected", [
    ({}, "The sum is 1,234.", "1234", 1.0),
    ({}, "12 + 3 is 15, so 16", "15", 0.0),  # the last number counts
    ({}, "no number at all", "3", 0.0),
    ({}, "$0.50", "0.5", 1.0),
    ({"match": "exact", "extract": "whole"}, "  Paris ", "paris", 1.0),
    ({"match": "exact", "extract": "whole", "case_sensitive": True}, "paris", "Paris", 0.0),
    ({"answer_extract": "gsm8k"}, "so 72.", "She sold 48 + 24 = 72 clips.\n#### 72", 1.0),
    ({"match": "regex", "extract": "whole"}, "colour", "colou?r", 1.0),
    ({"match": "math", "extract": "boxed"}, r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    ({"match": "math", "extract": "boxed"}, r"\boxed{(x+1)^2}", "$x^2+2x+1$", 1.0),
    ({"match": "math", "extract": "boxed"}, r"\boxed{3}", "4", 0.0),
    ({"extract": "boxed"}, r"so \boxed{2}, wait, it is \boxed{3}. Since {x}", "3", 1.0),  # the last box, its own braces
    ({"extract": "answer_tag"}, "<answer>42</answer> or 41", "42", 1.0),
    ({"extract": "gsm8k"}, "work...\n#### 72", "72", 1.0),
    ({"format": r"<answer>.*</answer>", "format_reward": 0.25}, "<answer>7</answer>", "7", 1.25),
    ({"format": r"<answer>.*</answer>", "format_reward": 0.25}, "<answer>8</answer>", "7", 0.25),
])
def test_a_response_is_checked_against_the_reference_answer(fields, response, answer, expected):
    r = _reward("verifiable", **fields)
    assert score(r, ["q"], [response], CPU, {"answer": [answer]}).item() == pytest.approx(expected)


def test_without_the_answer_field_the_reward_names_it_and_the_fields_there_are():
    with pytest.raises(ValueError, match=r"'answer'.*\['id'\]"):
        score(_reward("verifiable"), ["q"], ["1"], CPU, {"id": [3]})
    with pytest.raises(ValueError, match="reward.extract"):
        _reward("verifiable", extract="(unclosed")


def test_weighted_rewards_sum_their_parts_each_with_its_columns():
    w = _reward("weighted", weights={"verifiable": 1.0, "lexicon": 0.5}, settings={"lexicon": {"score_query": False}})
    responses = ["it is 4, great", "it is 5"]
    got = score(w, ["q", "q"], responses, CPU, {"answer": ["4", "4"]})
    lexicon = score(_reward("lexicon", score_query=False), ["q", "q"], responses, CPU)
    assert got.tolist() == pytest.approx((torch.tensor([1.0, 0.0]) + 0.5 * lexicon).tolist())
    with pytest.raises(registry.PluginError, match="nope"):
        _reward("weighted", weights={"nope": 1.0})


def test_a_reward_gets_the_columns_it_names_and_one_without_any_still_works():
    class NamesOne:
        def score(self, queries, responses, answer):
            return torch.tensor([float(a == r) for a, r in zip(answer, responses)])

    class TakesNone:
        def score(self, queries, responses):
            return torch.ones(len(responses))

    columns = {"answer": ["1", "2"], "id": [7, 8]}
    assert score(NamesOne(), ["", ""], ["1", "3"], CPU, columns).tolist() == [1.0, 0.0]
    assert score(TakesNone(), ["", ""], ["1", "3"], CPU, columns).tolist() == [1.0, 1.0]


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k_estimate(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2), by hand
    for n in (1, 4, 8, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k_estimate(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)
    assert pass_at_k_estimate(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the share correct


def test_prompt_files_carry_their_other_fields_to_the_reward(tmp_path):
    from rlhf.contracts.schema import DataConfig
    from rlhf.core.rollout.data import load_prompts

    rows = [{"prompt": [{"role": "user", "content": f"{i} + 1?"}], "answer": str(i + 1), "id": i} for i in range(5)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = load_prompts(DataConfig(prompts=str(tmp_path / "p.jsonl"), text_field="prompt", n_eval=2, n_train=3))
    assert [f["answer"] for f in held.fields] == ["1", "2"] and [f["id"] for f in train.fields] == [2, 3, 4]


@pytest.mark.slow
def test_grpo_raises_held_out_accuracy_on_the_arithmetic_task(tmp_path):
    r = cli("rlhf-train", "+experiment=arithmetic", "train.steps=150", "eval.every=150", "eval.samples=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    # The SFT build trains until its expected accuracy on validation sums is in [0.55, 0.75]; builds
    # of spec seeds 0-3 (standing in for machines that round differently) start at 0.536-0.598 here
    assert 0.4 < s["accuracy_start"] < 0.85, s
    # 800 samples each; measured gains +0.096 to +0.194 over those four builds and RL seeds 0 and 1
    assert s["accuracy_end"] > s["accuracy_start"] + 0.05, s
    assert s["pass@4_end"] >= s["pass@4_start"] and s["pass@1_end"] == pytest.approx(s["accuracy_end"])
    # the run ends by saying accuracy and pass@k beside the held-out reward
    assert f"accuracy          {s['accuracy_start']:.3f} -> {s['accuracy_end']:.3f}" in r.stdout, r.stdout[-1000:]
    assert "pass@8" in r.stdout and "pass@1 " not in r.stdout


def test_the_arithmetic_build_says_what_it_reached_and_lands_in_its_band():
    from rlhf.embedded.arithmetic import ArithmeticSpec, policy_path

    spec = ArithmeticSpec()
    built = json.loads((Path(policy_path()) / "built_by.json").read_text())
    reached = built["reached"]
    assert spec.target_low <= reached["expected_accuracy"] <= spec.target_high, reached
    assert 0 < reached["steps"] <= spec.max_steps and reached["steps"] % spec.check_every == 0
