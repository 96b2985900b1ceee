"""Cluster sweeps through hydra-submitit-launcher, run for real with its local executor.

The local executor starts every job as a process of its own under a controller, sends the
job the same signal a SLURM cluster does before the time limit (USR2), and requeues a job
that exits with submitit's requeue code: the path a preempted cluster job takes.
"""

import json
import signal
import subprocess
import time

import psutil
import pytest
import torch
from conftest import BIN, cli, compose, final_tensors

from rlhf.core.run import checkpoint

ARGS = ["optimizer=reinforce", "train.steps=40", "train.batch_size=8", "data.n_eval=4", "eval.every=20",
        "sampler.max_new_tokens=8", "checkpoint.every=2"]


def test_presets_compose_on_the_plugin_launchers():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    compose()  # discovers the plugins and stores the schema, as rlhf-train does
    with initialize_config_module("rlhf.conf", version_base="1.3"):
        cfg = hydra_compose("config", ["hydra/launcher=slurm"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
        assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.signal_delay_s >= 60
        cfg = hydra_compose("config", ["hydra/launcher=local"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("LocalLauncher")


@pytest.mark.slow
def test_preempted_job_checkpoints_is_requeued_and_resumes_to_the_same_result(tmp_path):
    """USR2 reaches the job after its first checkpoint: it finishes the step, checkpoints,
    submitit requeues it, and the requeued job resumes in the same run directory. Its
    weights equal those of a run that was never interrupted."""
    for d in ("plain", "sweep"):
        (tmp_path / d).mkdir()
    cwd = tmp_path / "sweep"
    proc = subprocess.Popen([str(BIN / "rlhf-train"), "-m", "hydra/launcher=local", *ARGS], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    signalled = None
    try:
        deadline = time.time() + 300
        while signalled is None and time.time() < deadline and proc.poll() is None:
            runs = [p.parent.parent for p in cwd.rglob(".hydra/config.yaml")]
            if runs and checkpoint.complete(runs[0]):
                tasks = [c for c in psutil.Process(proc.pid).children(recursive=True)
                         if "submitit.core._submit" in " ".join(c.cmdline())]
                assert len(tasks) == 1, tasks
                tasks[0].send_signal(signal.SIGUSR2)
                signalled = runs[0]
            time.sleep(0.005)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert signalled is not None, "the job ended before its first checkpoint could be seen"
    assert proc.returncode == 0, out[-3000:]

    summary = json.loads((signalled / "summary.json").read_text())
    assert 2 <= summary["resumed_from_step"] < 40, summary
    job_log = "".join(p.read_text() for p in (signalled.parent / ".submitit").glob("*/*_0_log.*"))
    assert "Caught signal SIGUSR2" in job_log and "preempted: checkpoint of step" in job_log
    assert f"requeued: resuming {signalled}" in job_log
    rows = [json.loads(line) for line in (signalled / "metrics.jsonl").read_text().splitlines()]
    train_steps = [row["step"] for row in rows if "train/reward" in row]
    assert train_steps == list(range(1, 41))  # every step logged once, none lost or repeated

    # one thread, as the submitit job gets (cpus_per_task=1): bit for bit needs the same thread count
    r = cli("rlhf-train", *ARGS, "threads=1", cwd=tmp_path / "plain")
    assert r.returncode == 0, r.stderr[-3000:]
    plain = next((tmp_path / "plain" / "outputs").rglob("summary.json")).parent
    a, b = final_tensors(plain), final_tensors(signalled)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_a_job_of_two_tasks_trains_data_parallel(tmp_path):
    """hydra.launcher.tasks_per_node=2: submitit starts two processes for the job, which
    join one process group (gloo here) as torchrun's would."""
    r = cli("rlhf-train", "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", *ARGS, "train.steps=3",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(next((tmp_path / "multirun").rglob("summary.json")).read_text())
    assert summary["data_parallel_ranks"] == 2 and summary["max_param_diff_across_ranks"] == 0.0
