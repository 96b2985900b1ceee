"""The core's update loop: one reduction rule under data parallelism, for every optimizer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

ON_POLICY = ["ppo", "a2c", "reinforce", "rloo", "grpo"]


def _run(name: str, out, ranks: int) -> None:
    script = str(ROOT / "tests" / "ddp_gradients.py")
    if ranks == 1:
        subprocess.run([sys.executable, script, name, str(out)], check=True, timeout=300)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, script, name, str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(ranks)]
    assert [p.wait(timeout=300) for p in procs] == [0] * ranks


@pytest.mark.parametrize("name", ON_POLICY)
def test_two_ranks_and_one_process_take_the_same_gradient_on_a_ragged_batch(name, tmp_path):
    """Every on-policy optimizer, the same global batch of responses of different lengths: the
    gradient DDP averages over 2 ranks (each holding half the prompts, so different numbers of
    tokens) equals one process's on the whole batch. A loss averaged per rank would not: the
    ranks' token counts differ."""
    _run(name, tmp_path / "one.pt", 1)
    _run(name, tmp_path / "two.pt", 2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys() and any(g.abs().max() > 1e-4 for g in one.values())
    worst = max(float((one[k] - two[k]).abs().max() / (one[k].abs().max() + 1e-8)) for k in one)
    assert worst < 1e-4, worst
