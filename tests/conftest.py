"""Shared fixtures: Hydra composition, the embedded default, tiny hub-style models saved locally."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# environment variables read when Python or a third-party library starts (before the fork
# server's children begin): a command given one of these runs as a fresh process
STARTUP_ENV = ("PYTHON", "HF_", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "CUDA", "LD_", "TOKENIZERS")


def cli(name: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an installed console script as a real subprocess; env values of None unset a variable.

    The process is forked from the fork server (tests/forkserver.py), which has imported
    torch, transformers and peft once, unless the environment changes what Python or those
    libraries read when they start; then it is the installed script, started from scratch."""
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert exe, f"{name} is not installed; run pip install -e '.[test]'"
    full_env = {**os.environ, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    changed = {k for k in set(full_env) | set(os.environ) if full_env.get(k) != os.environ.get(k)}
    if any(k.startswith(STARTUP_ENV) and k != "PYTHONPATH" for k in changed) or (
        "PYTHONPATH" in changed and os.environ.get("PYTHONPATH")
    ):
        return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return FORK_SERVER.run(name, [exe, *args], cwd=cwd, env=full_env, timeout=timeout)


class ForkServer:
    """The test side of tests/forkserver.py: started on first use, one per pytest process;
    calls from several threads at once are fine."""

    def __init__(self):
        self.proc = None
        self.lock = threading.Lock()
        self.waiting: dict[int, dict] = {}
        self.next_id = 0

    def _start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("forkserver.py")), str(BIN)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            msg = json.loads(line)
            with self.lock:
                slot = self.waiting[msg["id"]]
            slot.update(msg)
            if "rc" in msg:
                slot["done"].set()

    def run(self, name: str, argv: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "out", Path(tmp) / "err"
            with self.lock:
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                self.next_id += 1
                slot = self.waiting[self.next_id] = {"done": threading.Event()}
                request = {"id": self.next_id, "name": name, "argv": argv, "cwd": str(cwd), "env": env,
                           "out": str(out), "err": str(err)}
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
            if not slot["done"].wait(timeout):
                if "pid" in slot:
                    os.kill(slot["pid"], signal.SIGKILL)
                slot["done"].wait(30)
                raise subprocess.TimeoutExpired(argv, timeout, out.read_text(errors="replace"), err.read_text(errors="replace"))
            return subprocess.CompletedProcess(argv, slot["rc"], out.read_text(errors="replace"), err.read_text(errors="replace"))


FORK_SERVER = ForkServer()


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


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
