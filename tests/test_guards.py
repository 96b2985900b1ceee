"""Nothing let in: NaN and Inf stop a run at their step, PPO's ratio guard, the negative-KL
warning, failing jobs of a sweep, and wandb without a key or a network."""

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli, compose

from rlhf.core.loop.trainer import NonFiniteError, Trainer
from rlhf.core.run import checkpoint

FAULTS = {"PYTHONPATH": str(ROOT / "tests"), "RLHF_PLUGINS": "fault_plugins"}
SMALL = ["train.batch_size=4", "data.n_eval=4", "sampler.max_new_tokens=8"]


def _rows(run: Path) -> list[dict]:
    from rlhf.core.run import rundir

    return [rundir.from_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_reward_stops_the_run_at_its_step(value, tmp_path, embedded_dir):
    # score() calls: 1 = evaluation at step 0, then one per step; the 4th is step 3's batch
    r = cli("rlhf-train", "reward=faulty", f"reward.fail={value}", "reward.at_call=4", "train.steps=6",
            "checkpoint.every=1", "eval.every=100", *SMALL, cwd=tmp_path, env=FAULTS)
    assert r.returncode != 0
    assert f"step 3: train/reward = {value}" in r.stderr, r.stderr[-2000:]
    assert f"the reward source returned {value} for 1 of 4 responses, first row 2" in r.stderr
    said = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("rlhf-train:  ")]  # (the bar's lines)
    assert len(said) == 1 and said[0].startswith("rlhf-train: step 3") and "Traceback" not in r.stderr, r.stderr[-2000:]
    run = next((tmp_path / "outputs").rglob("metrics.jsonl")).parent
    assert f"NonFiniteError: step 3: train/reward = {value}" in (run / "error.txt").read_text()
    last = _rows(run)[-1]
    assert last["step"] == 3 and not math.isfinite(last["train/reward"])  # the NaN itself, logged
    assert [p.name for p in checkpoint.complete(run)] == ["step_000001", "step_000002"]  # keep=2, none for step 3
    assert "loss/policy" not in last  # the batch was not trained on


def test_a_non_finite_evaluation_score_is_a_warning_and_a_finding_and_every_file_stays_strict_json(tmp_path, embedded_dir):
    # score() calls: 1 = evaluation at step 0, 2 and 3 = the steps' batches, 4 = the evaluation at step 2
    r = cli("rlhf-train", "reward=faulty", "reward.fail=nan", "reward.at_call=4", "reward.once=true", "train.steps=2",
            "eval.every=2", *SMALL, cwd=tmp_path, env=FAULTS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "non-finite evaluation score: eval/reward = nan at step 2" in r.stderr, r.stderr[-2000:]
    run = next((tmp_path / "outputs").rglob("metrics.jsonl")).parent

    def strict(text: str):  # what a strict parser (RFC 8259: no NaN, no Infinity) reads
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a file the project wrote"))

    summary = strict((run / "summary.json").read_text())
    assert summary["reward_end"] is None and summary["nonfinite"] == {"reward_end": "nan"}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict(line)
    for f in (run / "samples").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            strict(line)
    d = cli("rlhf-diagnose", str(run), cwd=tmp_path)
    assert "non-finite evaluation score" in d.stdout, d.stdout[-2000:]


def _trainer(tmp_path, *overrides) -> Trainer:
    return Trainer(compose("train.steps=4", "eval.every=100", "checkpoint.every=1", *SMALL, *overrides), tmp_path)


def test_a_non_finite_loss_stops_the_run_and_no_checkpoint_holds_its_weights(tmp_path, embedded_dir):
    t = _trainer(tmp_path)
    update, calls = t.updater.step, []

    def poisoned(batch):
        calls.append(1)
        stats = dict(update(batch))
        if len(calls) == 2:
            stats["loss/policy"] = float("nan")
        return stats

    t.updater.step = poisoned
    with pytest.raises(NonFiniteError, match=r"step 2: loss/policy = nan; stopped before any weights it touched were saved; "
                                             r"the last checkpoint is .*step_000001"):
        t.fit()
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step_000001"]
    assert math.isnan(_rows(tmp_path)[-1]["loss/policy"])


def test_a_non_finite_kl_stops_the_run_before_the_update(tmp_path, embedded_dir):
    t = _trainer(tmp_path)
    source, calls = t.next_batch, []

    def broken(n):
        batch = source(n)
        calls.append(1)
        if len(calls) == 3:
            batch.ref_logprobs[1, 0] = -float("inf")  # the reference gives a sampled token probability 0
            batch = dataclasses.replace(batch, log_ratio=None)  # (its log ratio taken again, as collection takes it)
        return batch

    t.next_batch = broken
    before = {k: v.clone() for k, v in t.policy.trainable_state().items()}
    with pytest.raises(NonFiniteError, match=r"step 3: train/kl = inf \(log pi - log pi_ref is not finite in row 1"):
        t.fit()
    after = t.policy.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # steps 1 and 2 trained
    saved, _ = checkpoint.load(checkpoint.complete(tmp_path)[-1])
    assert all(torch.equal(saved[k], after[k]) for k in saved)  # step 3 never touched the weights


def test_ppo_skips_and_counts_minibatches_far_outside_the_trust_region(tmp_path, embedded_dir):
    t = _trainer(tmp_path)
    batch = t.next_batch(8)
    batch.logprobs = (batch.logprobs - 5.0) * batch.mask  # as if pi_old gave every token e^-5 of pi's probability
    before = {k: v.clone() for k, v in t.policy.trainable_state().items()}
    stats = t.updater.step(batch)
    assert stats["policy/skipped_minibatches"] == 16  # 4 epochs x 4 minibatches, ratio ~ e^5 > 10
    assert all(torch.equal(before[k], v) for k, v in t.policy.trainable_state().items())
    assert t.updater.step(t.next_batch(8))["policy/skipped_minibatches"] == 0


def test_a_sustained_negative_kl_warns_and_names_the_sampling_settings(tmp_path, embedded_dir):
    t = _trainer(tmp_path, "sampler.top_k=5", "train.steps=6", "checkpoint.every=0")
    source = t.next_batch

    def biased(n):  # log pi below log pi_ref on the sampled tokens, as truncated sampling gives
        batch = source(n)
        batch.logprobs = (batch.ref_logprobs - 0.05) * batch.mask
        return dataclasses.replace(batch, log_ratio=None)  # (its log ratio taken again, as collection takes it)

    t.next_batch = biased
    with pytest.warns(UserWarning,
                      match=r"train/kl has been negative for 5 steps in a row .* Settings that cause it: sampler.top_k=5"):
        t.fit()


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["sequential", "joblib"])
def test_a_job_that_raises_or_exits_does_not_stop_the_others(launcher, tmp_path, embedded_dir):
    r = cli("rlhf-train", "-m", *launcher, "reward=faulty", "reward.fail=none,raise,exit,none", "reward.at_call=2",
            "train.steps=2", "eval.every=2", "hydra.sweep.dir=sw", *SMALL, cwd=tmp_path, env=FAULTS)
    assert r.returncode != 0
    assert "sweep sw: 4 runs, 2 completed, 2 failed" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "failing on purpose" in (tmp_path / "sw" / "1" / "error.txt").read_text()
    assert "the run called sys.exit(1)" in (tmp_path / "sw" / "2" / "error.txt").read_text()
    for job in ("0", "3"):
        assert json.loads((tmp_path / "sw" / job / "summary.json").read_text())["steps"] == 2


def test_a_plugin_that_raises_prints_its_traceback_once_and_says_where_it_is_kept(tmp_path, embedded_dir):
    r = cli("rlhf-train", "reward=faulty", "reward.fail=raise", "reward.at_call=2", "train.steps=2", *SMALL,
            cwd=tmp_path, env=FAULTS)
    assert r.returncode != 0 and r.stderr.count("Traceback (most recent call last)") == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("rlhf-train: the run failed: ") and "failing on purpose" in last and "error.txt" in last, last
    run = next((tmp_path / "outputs").rglob("error.txt")).parent
    assert "failing on purpose" in (run / "error.txt").read_text()


def test_wandb_online_without_a_key_fails_at_once(tmp_path, embedded_dir):
    home = tmp_path / "cache"
    t0 = time.time()
    r = cli("rlhf-train", "logger=[wandb]", "logger.wandb.mode=online", cwd=tmp_path, timeout=120,
            env={"WANDB_API_KEY": None, "HOME": str(tmp_path), "RLHF_HOME": str(home)})
    assert r.returncode != 0
    assert "logger.wandb.mode=online needs an API key: set WANDB_API_KEY or run `wandb login`" in r.stderr
    assert not home.exists()  # before any model was built or loaded
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_wandb_online_without_a_network_falls_back_to_offline_and_exits(tmp_path, embedded_dir):
    t0 = time.time()
    r = cli("rlhf-train", "logger=[wandb]", "logger.wandb.mode=online", "logger.wandb.init_timeout=5", "train.steps=2",
            "eval.every=2", *SMALL, cwd=tmp_path, timeout=300,
            env={"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "HOME": str(tmp_path),
                 "RLHF_HOME": str(embedded_dir.parent)})
    elapsed = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wandb online init failed" in r.stderr and "logging offline" in r.stderr
    run = next((tmp_path / "outputs").rglob("summary.json")).parent
    assert list((run / "wandb").glob("offline-run-*"))
    assert elapsed < 120, elapsed
