"""Prompt sets from the generator and from local files; bad files named in the error."""

import json

import pytest

from rlhf.contracts.schema import DataConfig
from rlhf.core.rollout.data import load_prompts


def test_embedded_prompts_are_fixed_and_disjoint_from_training():
    train, held_out = load_prompts(DataConfig(n_train=50, n_eval=10))
    assert (train, held_out) == load_prompts(DataConfig(n_train=50, n_eval=10))
    assert len(train) == 50 and len(held_out) == 10 and not set(train) & set(held_out)


def test_local_files(tmp_path):
    (tmp_path / "p.txt").write_text("a one\n\nb two\nc three\n")
    assert load_prompts(DataConfig(prompts=str(tmp_path / "p.txt"), n_eval=1)) == (["b two", "c three"], ["a one"])
    rows = [{"prompt": f"text {i}"} for i in range(4)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    for name in ("p.jsonl", "p.json"):
        train, held = load_prompts(DataConfig(prompts=str(tmp_path / name), text_field="prompt", n_eval=1, n_train=2))
        assert held == ["text 0"] and train == ["text 1", "text 2"]


def test_bad_files_are_named(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"p.jsonl: row 1 has no field 'prompt' holding text"):
        load_prompts(DataConfig(prompts=str(tmp_path / "p.jsonl"), text_field="prompt"))
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="gave no training prompts"):
        load_prompts(DataConfig(prompts=str(tmp_path / "one.txt"), n_eval=1))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts(DataConfig(prompts=str(tmp_path / "missing.txt")))


def test_an_empty_prompt_file_is_named(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"data.prompts='.*empty.txt' gave no training prompts"):
        load_prompts(DataConfig(prompts=str(tmp_path / "empty.txt")))


def test_queries_and_responses_beyond_the_context_fail_at_the_start(tmp_path, embedded_dir):
    """The embedded policy attends over 128 positions: a response cap of 200 cannot fit."""
    from conftest import cli

    r = cli("rlhf-train", "sampler.max_new_tokens=200", "train.batch_size=4", "data.n_eval=4", cwd=tmp_path)
    assert r.returncode != 0
    assert "plus sampler.max_new_tokens=200 is more than the model's context of 128 positions" in r.stderr
    assert not list((tmp_path / "outputs").rglob("checkpoints"))


def _pairs_trainer(tmp_path, rows):
    from conftest import compose

    from rlhf.core.loop.trainer import Trainer

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = compose("optimizer=dpo", f"data.pairs={path}", "data.n_eval=1", "train.batch_size=2")
    return Trainer(cfg, tmp_path / "run")


def test_pairs_longer_than_the_context_or_without_a_prompt_name_the_file_row(tmp_path, embedded_dir):
    good = {"prompt": "The film was", "chosen": "good .", "rejected": "bad ."}
    long = {"prompt": "The film was", "chosen": "very " * 200 + "good .", "rejected": "bad ."}
    with pytest.raises(ValueError, match=r"pairs.jsonl: row 2 is \d+ tokens \(prompt \+ the longer response\), more than "
                                         r"the model's context of 128; shorten or drop it"):
        _pairs_trainer(tmp_path, [good, good, long, good])
    with pytest.raises(ValueError, match=r"pairs.jsonl: row 1 has an empty prompt"):
        _pairs_trainer(tmp_path, [good, {**good, "prompt": ""}, good])


def test_a_reward_source_with_the_wrong_number_of_scores_is_named():
    import torch

    from rlhf.core.rollout import collect

    class TwoScores:
        def score(self, queries, responses):
            return torch.zeros(2)

    with pytest.raises(ValueError, match=r"reward source TwoScores returned 2 scores for 3 responses; score\(\) must return "
                                         r"one float per response"):
        collect.score(TwoScores(), ["q"] * 3, ["r"] * 3, torch.device("cpu"))
