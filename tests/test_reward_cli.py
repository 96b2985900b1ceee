"""rlhf-train-rm and the reward sources it feeds, as real subprocesses."""

import json

from conftest import cli, compose

from rlhf.contracts import registry


def test_train_rm_then_ppo_on_it(tmp_path, embedded_dir):
    r = cli("rlhf-train-rm", "rm.steps=30", "rm.eval_every=10", "rm.normalize_samples=32", "data.n_eval=32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rm_run = next((tmp_path / "outputs").rglob("summary.json")).parent
    s = json.loads((rm_run / "summary.json").read_text())
    assert s["pairwise_accuracy"] >= 0.9 and s["held_out_pairs"] == 32
    assert (rm_run / "reward_model" / "model.safetensors").is_file()
    stats = json.loads((rm_run / "reward_model" / "normalization.json").read_text())
    assert stats["samples"] == 32 and stats["std"] > 0
    evals = [json.loads(x) for x in (rm_run / "metrics.jsonl").read_text().splitlines() if "eval/pairwise" in x]
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    assert f"reward.path={rm_run}" in r.stdout

    run = tmp_path / "ppo"
    run.mkdir()
    r = cli("rlhf-train", "reward=learned_rm", f"reward.path={rm_run}", "eval.judges=[sentiment,lexicon]",
            "train.steps=2", "eval.every=2", "train.batch_size=8", "data.n_eval=8", cwd=run)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(next(run.rglob("summary.json")).read_text())
    assert {"judge_sentiment_start", "judge_sentiment_end", "judge_lexicon_start", "judge_lexicon_end"} <= set(s)
    sample = json.loads(next(run.rglob("step_00002.jsonl")).read_text().splitlines()[0])
    assert {"sentiment", "lexicon", "reward"} <= set(sample)


def test_lexicon_scores_sentiment():
    info = next(p for p in registry.plugins("reward") if p.name == "lexicon")
    scores = info.cls(info.cls.Config()).score(
        ["The movie was", "The plot is", "It was"],
        ["wonderful . I adored it .", "dreadful and boring .", "released in five cinemas ."],
    )
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores[2] == 0


def test_train_rm_config_composes():
    cfg = compose("data.pairs=some.jsonl", config_name="train_rm")
    assert cfg.rm.steps == 100 and cfg.data.pairs == "some.jsonl" and cfg.policy.path == "embedded"
