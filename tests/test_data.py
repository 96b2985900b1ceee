"""Prompt sets from the generator and from local files; bad files named in the error."""

import json

import pytest

from rlhf.config import DataConfig
from rlhf.data import load_prompts


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
    with pytest.raises(ValueError, match=r"p.jsonl: row 1 has no string field 'prompt'"):
        load_prompts(DataConfig(prompts=str(tmp_path / "p.jsonl"), text_field="prompt"))
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="gave no training prompts"):
        load_prompts(DataConfig(prompts=str(tmp_path / "one.txt"), n_eval=1))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts(DataConfig(prompts=str(tmp_path / "missing.txt")))
