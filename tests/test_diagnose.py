"""Diagnoses: each detector on a record made to show its pathology, nothing on a healthy
one, and the real paths: live warnings in rlhf-train, rlhf-diagnose on runs and sweeps,
samples in the dashboards, the report's diagnosis section and gold-vs-proxy plot."""

from __future__ import annotations

import json
import math

import pytest
from conftest import cli

from rlhf.core.evaluation import diagnosis
from rlhf.core.evaluation.diagnosis import Record, diagnose

STEPS = 100
TINY = ["train.batch_size=4", "data.n_eval=4", "sampler.max_new_tokens=6"]


def run_record(evals=None, train=None, steps: int = STEPS, config=None) -> Record:
    """A record with evaluations every 10 steps and a training row every step.
    evals/train: {metric: f(fraction of the run) -> value}."""
    base_eval = {"eval/reward": lambda t: 0.4 + 0.5 * t, "eval/reward_std": lambda t: 0.4 - 0.2 * t,
                 "eval/kl": lambda t: 4 * t, "eval/fluency": lambda t: -1.2 - 0.2 * t, "eval/distinct_2": lambda t: 0.6,
                 "eval/repetition": lambda t: 0.02, "eval/response_len": lambda t: 12.0}
    base_train = {"train/reward": lambda t: 0.4 + 0.5 * t, "train/kl": lambda t: 4 * t + 0.1,
                  "policy/approx_kl": lambda t: 0.005, "policy/clipfrac": lambda t: 0.05, "policy/entropy": lambda t: 2.0 - t,
                  "val/explained_var": lambda t: 0.3, "optim/grad_norm": lambda t: 0.5, "objective/beta": lambda t: 0.05,
                  "policy/skipped_minibatches": lambda t: 0}
    base_eval.update(evals or {})
    base_train.update(train or {})
    rows = []
    for step in range(steps + 1):
        t = step / steps
        if step:
            rows.append({"step": step, **{k: f(t) for k, f in base_train.items() if f is not None}})
        if step % 10 == 0:
            rows.append({"step": step, **{k: f(t) for k, f in base_eval.items() if f is not None}})
    cfg = {"train": {"steps": steps}, "optimizer": {"beta": 0.05, "lr": 3e-4, "max_grad_norm": 1.0},
           "sampler": {"max_new_tokens": 24, "top_k": 0, "top_p": 1.0}}
    for k, v in (config or {}).items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return Record(rows, cfg, {STEPS: [{"query": "q", "response": "great great great", "reward": 0.9}]})


def names(record: Record) -> list[str]:
    return [f.name for f in diagnose(record)]


DPO_TRAIN = {k: None for k in ("train/reward", "train/kl", "policy/approx_kl", "policy/clipfrac", "policy/entropy",
                               "val/explained_var", "policy/skipped_minibatches")}


def test_a_healthy_run_has_no_findings():
    assert names(run_record()) == []
    dpo = run_record(train={**DPO_TRAIN, "loss/dpo": lambda t: 0.69 - 0.3 * t, "rewards/accuracy": lambda t: 0.5 + 0.3 * t,
                            "logps/chosen": lambda t: -30 + t, "logps/rejected": lambda t: -30 - 1.5 * t})
    assert names(dpo) == []


PLANTED = {
    "reward hacking": dict(evals={"eval/fluency": lambda t: -1.2 - 5 * t}),
    "over-optimisation: past the gold reward's peak": dict(evals={"eval/judge/sentiment": lambda t: 0.5 + 0.4 * t - 0.5 * t * t,
                                                                  "eval/judge_std/sentiment": lambda t: 0.2}),
    "KL blow-up": dict(evals={"eval/kl": lambda t: 80 * t}),
    "over-regularisation": dict(evals={"eval/reward": lambda t: 0.4, "eval/kl": lambda t: 0.02},
                                train={"objective/beta": lambda t: 10.0}, config={"optimizer.beta": 10.0}),
    "stagnation: steps too small": dict(evals={"eval/reward": lambda t: 0.4, "eval/kl": lambda t: 1e-4},
                                        train={"policy/approx_kl": lambda t: 1e-8, "policy/clipfrac": lambda t: 0.0}),
    "unstable: steps too large": dict(train={"policy/clipfrac": lambda t: 0.5, "policy/approx_kl": lambda t: 0.4}),
    "entropy collapse": dict(train={"policy/entropy": lambda t: 2.0 * (1 - t) + 0.01}),
    "value function explains nothing": dict(train={"val/explained_var": lambda t: -0.5}),
    "DPO likelihood displacement": dict(train={**DPO_TRAIN, "loss/dpo": lambda t: 0.69 - 0.4 * t,
                                               "rewards/accuracy": lambda t: 0.5 + 0.4 * t,
                                               "logps/chosen": lambda t: -30 - 10 * t, "logps/rejected": lambda t: -30 - 20 * t}),
    "DPO margin saturated": dict(train={**DPO_TRAIN, "loss/dpo": lambda t: 0.69 * math.exp(-30 * t),
                                        "rewards/accuracy": lambda t: min(1.0, 0.5 + 5 * t),
                                        "logps/chosen": lambda t: -30 + t, "logps/rejected": lambda t: -30 - t}),
    "biased KL estimate": dict(train={"train/kl": lambda t: -0.3}),
    "repeated PPO ratio skips": dict(train={"policy/skipped_minibatches": lambda t: 1 if int(t * 100) % 10 == 3 else 0}),
    "exploration trap: better responses sampled, not learned": dict(
        evals={"eval/reward": lambda t: 0.4 + 0.4 * min(t, 0.4), "eval/kl": lambda t: 1 + t},
        train={"train/reward_max": lambda t: 2.5}),
    "sampler-trainer mismatch": dict(train={"mismatch/kl": lambda t: 0.4, "mismatch/ess": lambda t: 0.1}),
    "reward saturated early": dict(evals={"eval/reward": lambda t: 0.95 if t >= 0.2 else 0.4,
                                          "eval/reward_std": lambda t: 0.01 if t >= 0.2 else 0.4}),
}


@pytest.mark.parametrize("pathology", sorted(PLANTED))
def test_each_planted_pathology_is_named_with_evidence_and_knobs(pathology):
    found = {f.name: f for f in diagnose(run_record(**PLANTED[pathology]))}
    assert pathology in found, found
    f = found[pathology]
    assert f.evidence and f.knobs and any("=" in k or "optimizer." in k or "sampler." in k or "train." in k for k in f.knobs)


def test_word_salad_that_a_sentiment_judge_likes_is_still_caught_by_fluency():
    """The issue's case: beta 0 and a lexicon reward; the sentiment judge rises with the reward
    and distinct-2 stays put, only the text's likelihood under the reference collapses."""
    r = run_record(evals={"eval/judge/sentiment": lambda t: 0.28 + 0.69 * t, "eval/distinct_2": lambda t: 0.7,
                          "eval/fluency": lambda t: -1.2 - 3 * t, "eval/kl": lambda t: 80 * t})
    found = {f.name: f for f in diagnose(r)}
    assert "reward hacking" in found and "fluency" in found["reward hacking"].evidence
    assert found["reward hacking"].sample == "great great great"
    assert "KL blow-up" in found


def test_a_truncating_sampler_is_a_biased_kl_whatever_the_estimates_show():
    found = {f.name: f for f in diagnose(run_record(config={"sampler.top_k": 2}))}
    assert "sampler.top_k=2" in found["biased KL estimate"].evidence
    # a policy at the reference: k1 estimates of +-0.02, negative now and then, are not a bias
    quiet = run_record(evals={"eval/reward": lambda t: 0.6, "eval/kl": lambda t: 0.01},
                       train={"train/kl": lambda t: -0.01 if int(t * 100) % 7 < 5 else 0.02})
    assert "biased KL estimate" not in names(quiet)


def test_one_update_far_outside_the_trust_region_is_named_even_after_a_collapse():
    r = run_record(train={"policy/approx_kl": lambda t: 3.3 if t < 0.015 else 0.0,
                          "policy/clipfrac": lambda t: 0.74 if t < 0.015 else 0.0})
    found = {f.name: f for f in diagnose(r)}
    assert "policy/approx_kl 3.3 nats at step 1" in found["unstable: steps too large"].evidence


def test_too_few_steps_say_nothing_yet():
    assert names(Record([{"step": 0, "eval/reward": 0.4, "eval/kl": 0.0, "eval/reward_std": 0.3}], {})) == []
    assert names(Record([], {})) == []


def test_live_diagnosis_says_each_finding_once():
    record = run_record(evals={"eval/kl": lambda t: 80 * t})
    live = diagnosis.LiveDiagnosis(record.config)
    said = []
    for row in record.rows:
        live.log({k: v for k, v in row.items() if k != "step"}, row["step"])
        if any(k.startswith("eval/") for k in row):
            said += [f.name for f in live.check()]
    assert said.count("KL blow-up") == 1


def test_a_run_warns_live_and_rlhf_diagnose_names_it_on_the_run_and_its_sweep(tmp_path, embedded_dir):
    """A learning rate 30x too high: the warning comes during training, and the command finds
    the same in the run directory and in the sweep that holds it."""
    r = cli("rlhf-train", "-m", "optimizer.lr=3e-2,3e-4", "train.steps=12", "eval.every=4", *TINY, "hydra.sweep.dir=sw",
            "logger=[tensorboard,wandb]", "eval.judges=[lexicon]", cwd=tmp_path, env={"WANDB_API_KEY": None})
    assert r.returncode == 0, r.stderr[-3000:]
    job_log = (tmp_path / "sw" / "0" / "train.log").read_text() if (tmp_path / "sw" / "0" / "train.log").exists() else ""
    assert "unstable: steps too large" in r.stderr + job_log, (r.stderr + job_log)[-3000:]
    one = cli("rlhf-diagnose", str(tmp_path / "sw" / "0"), cwd=tmp_path)
    assert one.returncode == 0 and "unstable: steps too large" in one.stdout
    assert "try: lower optimizer.lr (now 0.03)" in one.stdout
    both = cli("rlhf-diagnose", str(tmp_path / "sw"), "--json", cwd=tmp_path)
    rows = [json.loads(line) for line in both.stdout.splitlines()]
    assert [r["run"].rsplit("/", 1)[1] for r in rows] == ["0", "1"]
    assert "unstable: steps too large" in [f["name"] for f in rows[0]["findings"]]
    missing = cli("rlhf-diagnose", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode != 0 and "no such directory" in missing.stderr and "Traceback" not in missing.stderr

    # the samples reached TensorBoard as text, each evaluation's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((tmp_path / "sw" / "tensorboard").iterdir())), size_guidance={"tensors": 0})
    acc.Reload()
    assert "samples/text_summary" in acc.Tags()["tensors"]
    assert sorted(e.step for e in acc.Tensors("samples/text_summary")) == [0, 4, 8, 12]

    # and to wandb as a table, each evaluation's (offline here: no key, no network)
    tables = sorted((tmp_path / "sw" / "0").rglob("samples_*.table.json"))
    assert sorted(int(t.name.split("_")[1]) for t in tables) == [0, 4, 8, 12]
    table = json.loads(tables[-1].read_text())
    assert {"step", "query", "response", "reward", "kl", "lexicon"} <= set(table["columns"]) and len(table["data"]) > 0

    # and the report has the diagnosis and the curves beside the reward
    c = cli("rlhf-compare", str(tmp_path / "sw"), cwd=tmp_path)
    assert c.returncode == 0, c.stderr[-2000:]
    page = (tmp_path / "sw" / "report.html").read_text()
    assert "<h2>Diagnosis</h2>" in page and "unstable: steps too large" in page and "curves_over_steps" in page
    assert "Samples at the last evaluation" in page and 'alt="gold_vs_proxy"' in page


def test_a_slow_but_moving_run_and_one_word_answers_are_not_pathologies():
    """The arithmetic preset's healthy runs: a 0/1 reward (spread ~0.48) gaining 0.11 at a KL of
    0.36 nats with ordinary updates is learning, not stagnating; clipped gradients at 1.6x the
    cap are not unstable; one-word answers (distinct-2 of 0) scored alike at step 0 are not hacking."""
    slow = run_record(evals={"eval/reward": lambda t: 0.63 + 0.11 * t, "eval/reward_std": lambda t: 0.48,
                             "eval/kl": lambda t: 0.36 * t}, train={"policy/approx_kl": lambda t: 1e-3,
                                                                    "optim/grad_norm": lambda t: 1.6})
    assert names(slow) == []
    words = run_record(evals={"eval/reward": lambda t: 0.3 * t, "eval/reward_std": lambda t: 0.0 if t == 0 else 0.3,
                              "eval/distinct_2": lambda t: 0.8 * (1 - t), "eval/response_len": lambda t: 1.0})
    assert "reward hacking" not in names(words)


@pytest.mark.parametrize("optimizer", ["ppo", "a2c", "reinforce", "rloo", "grpo", "dpo", "sft"])
def test_every_override_a_finding_suggests_composes_for_that_optimizer(optimizer):
    """Each planted pathology on a record of a run with this optimizer (its real, composed config):
    every setting a finding suggests exists for that optimizer, and the override it names composes.
    (A finding once told PPO users to set optimizer.epochs, a field PPO did not have.)"""
    from conftest import compose
    from omegaconf import OmegaConf

    from rlhf.core.evaluation.diagnosis import Knob

    base = [f"optimizer={optimizer}", *(["data.pairs=embedded"] if optimizer in ("dpo", "sft") else [])]
    config = OmegaConf.to_container(compose(*base), resolve=True)
    suggested: dict[str, object] = {}
    for planted in [*PLANTED.values(), dict(config={"sampler.top_k": 2})]:
        record = run_record(**planted)
        record.config = {**config, **{k: v for k, v in record.config.items() if k not in config}}
        for key, value in (planted.get("config") or {}).items():  # the planted settings this optimizer has
            node = record.config
            *path, last = key.split(".")
            for p in path:
                node = node[p]
            if last in node:
                node[last] = value
        for finding in diagnose(record):
            for knob in finding.knobs:
                assert isinstance(knob, Knob), (finding.name, knob)
                if knob.key is not None:
                    suggested[knob.key] = knob.value if knob.value is not None else record.setting(knob.key)
    assert suggested, "no finding was made"
    for key, value in suggested.items():
        text = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
        compose(*base, f"{key}={text}")  # raises if the key does not exist or the value does not fit


def _targets(**groups: str) -> dict:
    from rlhf.contracts import registry

    registry.discover()
    names = {(p.group, p.name): p.target for p in registry.plugins()}
    return {f"{group}._target_": names[(group, name)] for group, name in groups.items()}


def test_the_documented_recipe_at_its_optimum_has_no_finding():
    """dm on an exploring proposal (the hard toys' recipe) at its known optimum: the exploring
    samples score above the held-out mean and are far from pi, their KL estimate runs negative;
    none of that is a pathology of this run, and nothing it already does is advised."""
    record = run_record(evals={"eval/reward": lambda t: 3.75, "eval/kl_to_optimum": lambda t: 0.003},
                        train={"train/reward_max": lambda t: 4.8, "train/kl": lambda t: -0.1,
                               "mismatch/kl": lambda t: 0.15, "mismatch/ess": lambda t: 0.1},
                        config={**_targets(optimizer="dm", proposal="explore"), "optimizer.correction": "none",
                                "proposal.temperature": 2.0})
    assert names(record) == []


def test_a_finding_never_advises_what_the_run_already_does():
    explore = {**_targets(optimizer="dm", proposal="explore"), "proposal.temperature": 2.0, "optimizer.k": 8}
    trapped = run_record(evals={"eval/reward": lambda t: 0.4 + 0.4 * min(t, 0.4), "eval/kl_to_optimum": lambda t: 0.9},
                         train={"train/reward_max": lambda t: 2.5}, config=explore)
    found = {f.name: f for f in diagnose(trapped)}
    knobs = found["exploration trap: better responses sampled, not learned"].knobs
    assert [k.key for k in knobs] == ["optimizer.k"], knobs  # not proposal=explore, not optimizer=dm: already so
    # a proposal's mismatch: the bounded corrections are advised to a run without one, not to one that has it
    mismatch = {"mismatch/kl": lambda t: 0.4, "mismatch/ess": lambda t: 0.1}
    for correction, advised in (("none", True), ("sequence_mis", False)):
        config = {**_targets(optimizer="reinforce", proposal="explore"), "optimizer.correction": correction,
                  "proposal.temperature": 3.0}
        f = {f.name: f for f in diagnose(run_record(train=mismatch, config=config))}["sampler-trainer mismatch"]
        assert ("optimizer.correction" in [k.key for k in f.knobs]) == advised, f.knobs
    # dm weighs by pi*/q itself: no correction to advise, no mismatch to name
    assert "sampler-trainer mismatch" not in names(run_record(train=mismatch, config=explore))
    # a proposal's negative KL estimate is over q's samples, not pi's: no biased-KL finding from it
    assert "biased KL estimate" not in names(run_record(train={"train/kl": lambda t: -0.3}, config=explore))


def test_at_its_known_optimum_a_run_has_no_finding_about_the_way_there():
    """Every step clipped (PPO on the toy bandit clips them all, and lands on pi* to 1e-7): at
    the optimum that is not 'steps too large'; the same record without the optimum is."""
    clipped = {"optim/grad_norm": lambda t: 3.3}
    assert "unstable: steps too large" in names(run_record(train=clipped))
    at_optimum = run_record(evals={"eval/kl_to_optimum": lambda t: 1e-7}, train=clipped)
    assert names(at_optimum) == []


def test_the_episodes_findings_hold_on_their_evidence():
    """Episodes cut by the turn limit, a tool that keeps failing, a per-turn reward that stays
    flat while the policy moves: each named on a record that shows it, none on one that does not."""
    cut = run_record(train={"episode/truncated": lambda t: 0.8, "episode/turns": lambda t: 4.0})
    assert "episodes cut by the turn limit" in names(cut)
    failing = run_record(train={"episode/tool_errors": lambda t: 1.2})
    assert "tool errors" in names(failing)
    flat = run_record(evals={"eval/episode/turn_reward": lambda t: 0.3, "eval/kl": lambda t: 4 * t})
    assert "per-turn reward flat" in names(flat)
    healthy = run_record(train={"episode/truncated": lambda t: 0.1, "episode/tool_errors": lambda t: 0.05},
                         evals={"eval/episode/turn_reward": lambda t: 0.3 + 0.5 * t})
    assert not {"episodes cut by the turn limit", "tool errors", "per-turn reward flat"} & set(names(healthy))
