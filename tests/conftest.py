"""Shared fixtures: Hydra composition, the embedded default, tiny hub-style models saved locally."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cli(name: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an installed console script as a real subprocess; env values of None unset a variable."""
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert exe, f"{name} is not installed; run pip install -e '.[test]'"
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={k: v for k, v in full_env.items() if v is not None},
    )


def final_tensors(run: Path) -> dict:
    """Every tensor a run saved in `final/` (adapters, value head), named by file and key."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted((run / "final").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    assert out
    return out


def compose(*overrides: str, config_name: str = "config"):
    """The config exactly as rlhf-train (or rlhf-train-rm) composes it, through Hydra's compose API."""
    from rlhf.contracts.schema import compose as rlhf_compose

    return rlhf_compose(list(overrides), config_name)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The real embedded default (built once into the user's cache if missing)."""
    from rlhf.embedded.build import ensure_built

    return ensure_built()


@pytest.fixture(scope="session")
def hub_style_models(tmp_path_factory, embedded_dir) -> dict[str, str]:
    """Randomly initialised GPT-2 and DistilBERT saved like hub checkpoints.

    The GPT-2 tokenizer has no pad token, as the hub's gpt2 has none; the classifier has
    the NEGATIVE/POSITIVE labels of lvwerra/distilbert-imdb.
    """
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("hub")
    tok = AutoTokenizer.from_pretrained(embedded_dir / "policy")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
    gpt2.save_pretrained(out / "gpt2")
    tok.pad_token = None
    tok.save_pretrained(out / "gpt2")
    clf = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=1, n_heads=2, max_position_embeddings=64,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    ))
    clf.save_pretrained(out / "distilbert")
    AutoTokenizer.from_pretrained(embedded_dir / "sentiment").save_pretrained(out / "distilbert")
    return {"policy": str(out / "gpt2"), "reward": str(out / "distilbert")}


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A small reward model trained by the real rlhf-train-rm code (in-process)."""
    from rlhf.apps.train_rm import train_reward_model

    run = tmp_path_factory.mktemp("rm")
    cfg = compose("rm.steps=15", "rm.eval_every=15", "rm.normalize_samples=16", "data.n_eval=16",
                  "data.n_train=200", config_name="train_rm")
    train_reward_model(cfg, run)
    return run
