"""Data-parallel training: 2 processes on the CPU (gloo), started by torchrun, or forked
as ranks with the environment torchrun gives them (`ranks`).

Every rank builds the same global batch and samples its own rows of it with the random
numbers those rows get in one process, so two ranks of 4 must reproduce one process of 8
up to floating-point summation order, and the ranks' parameters must stay identical.
"""

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, cli, final_tensors, launch

SMALL = ["train.batch_size=8", "data.n_eval=4", "sampler.max_new_tokens=8", "eval.every=100", "threads=1"]


def torchrun(*args: str, cwd: Path):
    return cli("torchrun", "--standalone", "--nproc_per_node=2", "-m", "rlhf.apps.train", *args, cwd=cwd, timeout=600)


def start_ranks(*args: str, cwd: Path, n: int = 2) -> list:
    """`rlhf-train` as the n ranks of one job, each forked from the tests' fork server with the
    environment torchrun gives its ranks (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), which is all the library reads: torchrun's own start (its agent, and n
    fresh interpreters importing torch) costs about 7 s a job, and the suite runs a dozen.
    test_ppo_ranks_stay_identical starts its job with torchrun itself."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    common = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return [launch("rlhf-train", *args, cwd=cwd, env={**common, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(n)]


def ranks(*args: str, cwd: Path, n: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a job of n ranks (start_ranks) to its end: rank 0's stdout, every rank's stderr, the
    first failing rank's status. When a rank fails the others get 30 s to end, then are
    stopped, as torchrun stops them."""
    procs = start_ranks(*args, cwd=cwd, n=n)
    deadline, failed_at = time.time() + timeout, None
    while any(p.poll() is None for p in procs) and time.time() < min(deadline, (failed_at or deadline + 30) + 30):
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.time()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outs = [p.communicate() for p in procs]
    status = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(list(args), status, outs[0][0], "".join(err for _, err in outs))


def result(cwd: Path) -> tuple[dict[str, torch.Tensor], dict, list[dict]]:
    run = next((cwd / "outputs").rglob("summary.json")).parent
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return final_tensors(run), json.loads((run / "summary.json").read_text()), rows


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metric_rows(rows: list[dict], keys: tuple[str, ...]) -> list[tuple]:
    return [(r["step"], *(r[k] for k in keys)) for r in rows if keys[0] in r]


def assert_metrics_close(one: list[dict], two: list[dict], keys: tuple[str, ...], tol: float) -> None:
    a, b = metric_rows(one, keys), metric_rows(two, keys)
    assert [r[0] for r in a] == [r[0] for r in b] and a
    worst = max(abs(x - y) / max(1.0, abs(x)) for ra, rb in zip(a, b) for x, y in zip(ra[1:], rb[1:]))
    assert worst <= tol, (keys, worst)  # relative to the value where it is above 1 (a KL of 8 nats)


def test_torchrun_is_installed_with_torch():
    assert (BIN / "torchrun").exists()


@pytest.mark.slow
def test_two_ranks_resumed_equal_one_process_with_the_same_global_batch(tmp_path, embedded_dir):
    """REINFORCE: 2 ranks x 4 rollouts for 2 steps, resumed as 2 ranks for 2 more, against one
    process of 8 rollouts for 4 steps."""
    args = ["optimizer=reinforce", "checkpoint.every=2", *SMALL]
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    # one thread, as each of the two ranks gets on 2 cores: sums split over threads round differently
    r = cli("rlhf-train", *args, "train.steps=4", "threads=1", cwd=tmp_path / "one")
    assert r.returncode == 0, r.stderr[-3000:]
    r = ranks(*args, "train.steps=2", cwd=tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    run = next((tmp_path / "two" / "outputs").rglob("summary.json")).parent
    r = ranks(f"resume={run}", "train.steps=4", cwd=tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout

    one, _, rows_one = result(tmp_path / "one")
    two, summary, rows_two = result(tmp_path / "two")
    assert summary["data_parallel_ranks"] == 2 and summary["resumed_from_step"] == 2
    assert summary["max_param_diff_across_ranks"] == 0.0  # the ranks never drift apart
    # Samples, rewards and losses agree (below); the weights to float noise that Adam amplifies:
    # it divides each gradient entry by its own running scale, so an entry whose gradient is
    # near zero (a LoRA A matrix while B is still near its zero init) moves by a noise-driven
    # step. Measured with transformers 5.24.0: 2.6e-5 (most tensors 1e-8); 2e-6 when this
    # test was written, with an older transformers. The largest weight is 0.09.
    assert max_diff(one, two) < 1e-4, max_diff(one, two)
    def train(rows):
        return [(r["step"], r["train/reward"], r["train/response_len"]) for r in rows if "train/reward" in r]
    assert [(s, round(x, 5), n) for s, x, n in train(rows_one)] == [(s, round(x, 5), n) for s, x, n in train(rows_two)]


@pytest.mark.slow
def test_two_ranks_of_dpo_equal_one_process_data_parallel_and_sharded(tmp_path, embedded_dir):
    """DPO on LoRA adapters, 2 ranks x 4 pairs against one process of 8: data-parallel, and
    sharded (parallel=fsdp: frozen base and trained adapters sharded in the same units, the
    reference the base with the adapters off, gathered collectively). The sharded job's
    checkpoint then resumes on one process and ends where the one-process run did."""
    import shutil

    args = ["optimizer=dpo", "data.n_train=32", "train.steps=3", "checkpoint.every=2", *SMALL]
    for d in ("one", "two", "sharded"):
        (tmp_path / d).mkdir()
    assert cli("rlhf-train", *args, cwd=tmp_path / "one").returncode == 0
    r = ranks(*args, cwd=tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    (one, _, rows_one), (two, summary, _) = result(tmp_path / "one"), result(tmp_path / "two")
    assert summary["max_param_diff_across_ranks"] == 0.0 and summary["parallel"] == "ddp"
    # Samples, rewards and losses agree (below); the weights to float noise that Adam amplifies:
    # it divides each gradient entry by its own running scale, so an entry whose gradient is
    # near zero (a LoRA A matrix while B is still near its zero init) moves by a noise-driven
    # step. Measured with transformers 5.24.0: 2.6e-5 (most tensors 1e-8); 2e-6 when this
    # test was written, with an older transformers. The largest weight is 0.09.
    assert max_diff(one, two) < 1e-4, max_diff(one, two)

    r = ranks(*args, "parallel=fsdp", cwd=tmp_path / "sharded")
    assert r.returncode == 0, r.stderr[-3000:]
    sharded, summary, rows_sharded = result(tmp_path / "sharded")
    assert summary["parallel"] == "fsdp" and summary["max_eval_diff_across_ranks"] == 0.0
    assert_metrics_close(rows_one, rows_sharded, ("loss/dpo",), 1e-5)
    assert max_diff(one, sharded) < 1e-5, max_diff(one, sharded)  # measured 4.4e-7

    # the sharded checkpoint of step 2, resumed by one process (DCP reshards on load)
    run = next((tmp_path / "sharded" / "outputs").rglob("summary.json")).parent
    shutil.rmtree(run / "final"), shutil.rmtree(run / "checkpoints" / "step_000003"), (run / "summary.json").unlink()
    r = cli("rlhf-train", f"resume={run}", "parallel=ddp", cwd=tmp_path / "sharded")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from step_000002" in r.stdout
    assert max_diff(one, final_tensors(run)) < 1e-5


@pytest.mark.slow
def test_ppo_ranks_stay_identical(tmp_path, embedded_dir):
    """PPO's minibatches are each rank's own (as in every data-parallel PPO), so it is not the
    one-process run step for step; the ranks must still hold the same parameters throughout."""
    r = torchrun("optimizer=ppo", "train.steps=3", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _, summary, rows = result(tmp_path)
    assert summary["data_parallel_ranks"] == 2 and summary["max_param_diff_across_ranks"] == 0.0
    assert [row["step"] for row in rows if "loss/policy" in row] == [1, 2, 3]
    assert summary["torch_threads"] == 1


def test_rows_of_the_global_batch_and_an_uneven_batch_refused(monkeypatch):
    """Rank 1 of 2 keeps rows 4..7 of 8; a batch that does not split is refused, naming the fix
    (the Trainer calls this before any model loads)."""
    from rlhf.core.parallel import distributed

    monkeypatch.setattr(distributed, "world", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard(8) == (4, 8)
    with pytest.raises(ValueError, match="a global batch of 7 does not split evenly over 2 processes; "
                                         "set train.batch_size to a multiple of 2"):
        distributed.shard(7)
