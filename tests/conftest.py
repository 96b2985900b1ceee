"""Shared fixtures: Hydra composition, the embedded default, tiny hub-style models saved locally."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from rlhf.apps import forkserver

# Under pytest-xdist the workers share the cores: each gets its share of torch threads (set
# before torch is first imported, so the fork server and every command inherit it). Small
# models gain little from a second thread (measured: a 30-step embedded run 30.5 s on one
# thread, 25.8 s on two, for 37% more CPU), so two one-thread workers finish the suite sooner.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# environment variables read when Python or a third-party library starts (before the fork
# server's children begin): a command given one of these runs as a fresh process
STARTUP_ENV = ("PYTHON", "HF_", "TRANSFORMERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "CUDA", "LD_", "TOKENIZERS")


def launch(name: str, *args: str, cwd: Path, env: dict | None = None) -> "Command | subprocess.Popen":
    """Start an installed console script as a real process, its stdout and stderr captured as
    text; env values of None unset a variable. Used as `subprocess.Popen` is (pid, poll, wait,
    send_signal, kill, communicate).

    The process is forked from the fork server (rlhf/apps/forkserver.py, which has imported
    torch, transformers and peft once), unless the environment changes what Python or those
    libraries read when they start; then it is the installed script, started from scratch."""
    exe = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert exe, f"{name} is not installed; run pip install -e '.[test]'"
    # a command is the first of its tree: the keys of the user's command line are its own
    full_env = {**os.environ, "RLHF_COMMAND_LINE": None, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    changed = {k for k in set(full_env) | set(os.environ) if full_env.get(k) != os.environ.get(k)}
    if any(k.startswith(STARTUP_ENV) and k != "PYTHONPATH" for k in changed) or (
        "PYTHONPATH" in changed and os.environ.get("PYTHONPATH")
    ):
        return subprocess.Popen([exe, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=full_env)
    return Command(name, [exe, *args], cwd, full_env)


def cli(name: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run an installed console script to its end (see `launch`)."""
    proc = launch(name, *args, cwd=cwd, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# the fork server's imports: the library's, and the two architectures the embedded default uses
FORK_SERVER = forkserver.ForkServer(
    preload=(*forkserver.PRELOAD, "transformers.models.gpt2.modeling_gpt2", "transformers.models.distilbert.modeling_distilbert"),
    env={k: v for k, v in os.environ.items()})


class Command:
    """A console script forked from FORK_SERVER, its output going to files read back as text."""

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict):
        (ep,) = entry_points(group="console_scripts", name=name)
        self.args, self.tmp = argv, tempfile.TemporaryDirectory()
        self.out, self.err = Path(self.tmp.name) / "out", Path(self.tmp.name) / "err"
        # sys.path[0] is the console script's directory, as for the installed script
        self.proc = FORK_SERVER.spawn(ep.value, argv=argv, cwd=cwd, env=env, path0=str(BIN), stdout=str(self.out),
                                      stderr=str(self.err))
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.kill()

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.proc.wait(timeout)
        return self.out.read_text(errors="replace"), self.err.read_text(errors="replace")


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
    """The real embedded default (built once into the user's cache if missing, on every core,
    as the README's commands build it; the other worker waits for it on the build's lock)."""
    import torch

    from rlhf.embedded.build import ensure_built

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return ensure_built()
    finally:
        torch.set_num_threads(threads)


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


# ---------------------------------------------------------------------------- the tiers
# Every test is one tier, marked at collection from what it does (pyproject.toml's markers):
#   browser  drives Debian's chromium (a page is rendered)
#   cli      starts a command as a process of its own (cli, launch, a subprocess of the
#            project's commands), itself or through a fixture
#   slow     marked by hand: a training run of many steps, a wheel build
#   unit     the rest: in-process, seconds; `pytest -m unit` runs them in about a minute
# Quick check while working: `pytest -m unit`; the whole suite: `pytest`.
CLI_CALLS = ("cli(", "launch(", "start(", "subprocess.run([sys.executable", "subprocess.Popen([sys.executable",
             "on_multirun_start(", "torch.multiprocessing")


def _source(obj) -> str:
    import inspect

    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("browser") or item.get_closest_marker("cli") or item.get_closest_marker("unit"):
            continue
        fixtures = item._fixtureinfo.name2fixturedefs if hasattr(item, "_fixtureinfo") else {}
        own = _source(getattr(item, "function", None))
        sources = [own, *(_source(d[-1].func) for name, d in fixtures.items() if name not in ("embedded_dir",))]
        # and the module's own helpers the test calls (one level down: a helper that starts processes)
        module = getattr(item, "module", None)
        sources += [_source(f) for name, f in vars(module).items() if callable(f) and getattr(f, "__module__", "") ==
                    module.__name__ and not name.startswith("test_") and f"{name}(" in own] if module else []
        text = "\n".join(sources)
        if "CHROMIUM" in text or "sync_playwright" in text:
            item.add_marker(pytest.mark.browser)
        elif any(call in text for call in CLI_CALLS):
            item.add_marker(pytest.mark.cli)
        elif not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.unit)


def deterministic_rows(path: Path | str) -> list[dict]:
    """A run's metrics.jsonl rows without what wall-clock time decides (time/..., the engine's
    sync seconds): what two runs that compute the same must share, to the bit."""
    import json

    text = Path(path).read_text() if not str(path).startswith("{") else str(path)
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "proposal/sync_s"}
            for line in text.splitlines()]
