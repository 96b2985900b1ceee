"""The embedded default: varied text, deterministic cached builds, a loadable pipeline."""

import json
import os

import pytest

from rlhf.embedded import build, corpus

# targets a few steps always meet: these tests are about the cache, not the models' quality
TINY = build.BuildSpec(n_reviews=300, vocab_size=300, policy_steps=8, classifier_steps=8, batch_size=8,
                       policy_loss_target=99.0, classifier_accuracy_target=0.0, held_out=20)


def test_generator_is_varied_and_deterministic():
    texts = [t for t, _ in corpus.reviews(3000, seed=0)]
    assert texts == [t for t, _ in corpus.reviews(3000, seed=0)]
    assert texts != [t for t, _ in corpus.reviews(3000, seed=1)]
    words = {w.strip(".,!").lower() for t in texts for w in t.split()}
    assert len(words) >= 300, len(words)  # several hundred distinct words
    assert len(set(texts)) > 0.99 * len(texts)  # almost no review repeats
    assert sum(len(s) for s in corpus.SHAPES.values()) >= 40  # many sentence shapes
    labels = [lab for _, lab in corpus.reviews(300, seed=0)]
    assert {lab: labels.count(lab) for lab in corpus.LABELS} == {"negative": 100, "neutral": 100, "positive": 100}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_cache_location_honours_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "rlhf"
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "mine"))
    assert build.cache_root() == tmp_path / "mine"


def test_build_is_deterministic_cached_and_rebuilt_when_damaged(home, tmp_path, monkeypatch):
    first = build.ensure_built(TINY, quiet=True)
    manifest = json.loads((first / "manifest.json").read_text())
    assert {"policy/model.safetensors", "sentiment/model.safetensors", "policy/tokenizer.json"} <= set(manifest["files"])

    # a second build elsewhere from the same seed gives the same bytes
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "other"))
    again = build.ensure_built(TINY, quiet=True)
    assert json.loads((again / "manifest.json").read_text())["files"] == manifest["files"]
    monkeypatch.setenv("RLHF_HOME", str(home))

    # cached: the same directory comes back without rebuilding
    mtime = os.stat(first / "manifest.json").st_mtime_ns
    assert build.ensure_built(TINY, quiet=True) == first
    assert os.stat(first / "manifest.json").st_mtime_ns == mtime

    # damaged (a truncated weight file) or half-deleted: rebuilt, identical again
    weights = first / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert build.ensure_built(TINY, quiet=True) == first
    assert json.loads((first / "manifest.json").read_text())["files"] == manifest["files"]
    (first / "sentiment" / "config.json").unlink()
    build.ensure_built(TINY, quiet=True)
    assert (first / "sentiment" / "config.json").is_file()
    assert not [p for p in home.iterdir() if p.name.startswith(".building-")]


def test_a_part_short_of_its_target_trains_on_then_fails_saying_what_it_reached(home):
    from dataclasses import replace

    short = replace(TINY, classifier_accuracy_target=1.01)  # never met: 8 steps, then 8 more a tenth at a time
    with pytest.raises(build.TargetNotReached, match=r"sentiment classifier reached 0\.\d+ after 16 steps"):
        build.ensure_built(short, quiet=True)
    assert not [p for p in home.iterdir() if p.is_dir()]  # nothing left that looks built


def test_the_default_build_records_what_each_part_reached(embedded_dir):
    spec, manifest = build.BuildSpec(), json.loads((embedded_dir / "manifest.json").read_text())
    assert manifest["reached"]["policy_held_out_loss"] <= spec.policy_loss_target
    assert manifest["reached"]["classifier_held_out_accuracy"] >= spec.classifier_accuracy_target


def test_default_classifier_loads_in_a_sentiment_pipeline(embedded_dir):
    from transformers import pipeline

    clf = pipeline("sentiment-analysis", model=str(embedded_dir / "sentiment"))
    out = clf(["The acting was wonderful . I adored this drama film .",
               "What a dreadful plot ! I want those three hours back .",
               "The story is set in Oslo . It was released in five cinemas ."])
    assert [o["label"] for o in out] == ["POSITIVE", "NEGATIVE", "NEUTRAL"]


def test_default_policy_writes_reviews(embedded_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir / "policy")
    model = AutoModelForCausalLM.from_pretrained(embedded_dir / "policy")
    assert tok.pad_token_id != tok.eos_token_id
    torch.manual_seed(0)
    ids = tok("The movie was", return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("The movie was ") and len(text.split()) >= 5
