"""rlhf-train as a real subprocess: the run directory, hub-style loading, loggers, warnings."""

import json

import pytest
from conftest import cli


def _run_dir(cwd):
    dirs = [p.parent for p in (cwd / "outputs").rglob("summary.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.slow
def test_main_job_learns_positive_reviews(tmp_path, embedded_dir):
    """The README's main job, exactly as written: no arguments."""
    r = cli("rlhf-train", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = _run_dir(tmp_path)
    s = json.loads((run / "summary.json").read_text())
    assert s["reward_end"] - s["reward_start"] >= 0.3, s
    assert 0 <= s["kl_end"] < 10, s
    assert f"run directory     {run}" in r.stdout and "held-out reward" in r.stdout
    # no library's deprecation notice in a run's output (transformers 5.2x deprecates past_key_values)
    assert "deprecated" not in r.stderr.lower() and "FutureWarning" not in r.stderr, r.stderr[-3000:]


def test_run_directory_contents(tmp_path, embedded_dir):
    r = cli("rlhf-train", "train.steps=3", "eval.every=2", "train.batch_size=8", "data.n_eval=8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = _run_dir(tmp_path)
    assert (run / ".hydra" / "config.yaml").is_file() and (run / ".hydra" / "overrides.yaml").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval/reward" in row]
    assert [row["step"] for row in evals] == [0, 2, 3]
    assert {"eval/kl", "eval/response_len", "eval/distinct_2"} <= set(evals[0])
    train_rows = [row for row in rows if "train/reward" in row]
    assert [row["step"] for row in train_rows] == [1, 2, 3]
    assert {"loss/policy", "loss/value", "policy/approx_kl", "policy/clipfrac", "val/explained_var"} <= set(train_rows[0])
    s = json.loads((run / "summary.json").read_text())
    assert {"reward_start", "reward_end", "kl_end", "steps", "wall_s"} <= set(s) and s["steps"] == 3
    assert s["reward_start"] == evals[0]["eval/reward"] and s["kl_end"] == evals[-1]["eval/kl"]
    samples = [json.loads(line) for line in (run / "samples" / "step_00003.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"query", "response", "reward", "kl"} <= set(samples[0])
    assert (run / "final" / "adapter_model.safetensors").is_file() and (run / "final" / "value_head.safetensors").is_file()
    assert not list((run / "final").glob("*.bin"))


def test_hub_style_checkpoints_load_through_the_presets(tmp_path, hub_style_models):
    """policy=gpt2 and a distilbert-imdb-like reward, with local copies in place of the hub."""
    r = cli("rlhf-train", "policy=gpt2", f"policy.path={hub_style_models['policy']}",
            f"reward.model={hub_style_models['reward']}", "train.steps=2", "eval.every=1",
            "train.batch_size=4", "data.n_eval=4", "sampler.max_new_tokens=6", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((_run_dir(tmp_path) / "summary.json").read_text())
    assert 0 <= s["reward_end"] <= 1


def test_full_finetuning_and_wandb_offline(tmp_path, embedded_dir):
    r = cli("rlhf-train", "policy.lora.enabled=false", "logger=[wandb]", "train.steps=2", "eval.every=2",
            "train.batch_size=4", "data.n_eval=4", cwd=tmp_path,
            env={"WANDB_API_KEY": None, "WANDB_MODE": None, "HOME": str(tmp_path),
                 "RLHF_HOME": str(embedded_dir.parent)})  # no ~/.netrc key either
    assert r.returncode == 0, r.stderr[-3000:]
    run = _run_dir(tmp_path)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert (run / "final" / "model.safetensors").is_file()


def test_biasing_sampler_settings_are_named_in_a_warning(tmp_path, embedded_dir):
    r = cli("rlhf-train", "sampler.top_k=5", "sampler.top_p=0.9", "train.steps=1", "eval.every=1",
            "train.batch_size=4", "data.n_eval=4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sampler.top_k=5 makes responses differ" in r.stderr
    assert "sampler.top_p=0.9 makes responses differ" in r.stderr
