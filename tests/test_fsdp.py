"""Sharded training (parallel=fsdp): 2 ranks on the CPU (gloo), forked with torchrun's
environment (test_distributed.ranks; DPO's sharded run is in test_distributed.py, sharing
its one-process run with DDP's).

Each rank holds half of every weight, gradient and Adam moment; the global batch and the
random numbers are those of data parallelism, so two sharded ranks of 4 rollouts must
reproduce one process of 8 up to floating-point summation order.
"""

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import cli, deterministic_rows, final_tensors
from test_distributed import SMALL, assert_metrics_close, max_diff, ranks, result, start_ranks

from rlhf.core.run import checkpoint

FSDP = ["parallel=fsdp", *SMALL]


def kill_job_between_checkpoints(cwd: Path, args: list[str], every: int) -> Path:
    """Start a job of 2 ranks, wait until it has logged a step past its second checkpoint and
    not written the third, and kill -9 every rank at once (a machine going down)."""
    procs = start_ranks(*args, cwd=cwd)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and all(p.poll() is None for p in procs):
            runs = [p.parent for p in (cwd / "outputs").rglob("metrics.jsonl")] if (cwd / "outputs").exists() else []
            if runs:
                steps = [json.loads(line)["step"] for line in (runs[0] / "metrics.jsonl").read_text().splitlines()
                         if line.endswith("}")]
                done = [p.name for p in checkpoint.complete(runs[0])]
                if steps and max(steps) >= 2 * every + 1 and done == [f"step_{every:06d}", f"step_{2 * every:06d}"]:
                    for p in procs:
                        p.send_signal(signal.SIGKILL)
                    for p in procs:
                        p.wait()
                    return runs[0]
            time.sleep(0.003)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = [p.communicate()[1] for p in procs]
    pytest.fail(f"the job ended ({[p.returncode for p in procs]}) before it could be killed between checkpoints: "
                f"{errs[0][-2000:]}")


@pytest.mark.slow
def test_sharded_reinforce_equals_one_process_and_a_killed_job_resumes_bit_identical(tmp_path, embedded_dir):
    """Full fine-tuning (every weight trained and sharded, the tied embeddings included; the
    frozen reference copy sharded too), REINFORCE, 2 ranks x 4 rollouts against one process
    of 8; then the same sharded job, both ranks killed with SIGKILL between checkpoints, a byte of rank
    1's shard of its newest checkpoint damaged, and resumed: rank 1 alone checks that file,
    so the ranks must agree to fall back to the checkpoint before it."""
    args = ["optimizer=reinforce", "policy.lora.enabled=false", "train.steps=10", "checkpoint.every=3",
            "eval.every=3", *FSDP]
    for d in ("one", "two", "killed"):
        (tmp_path / d).mkdir()
    r = cli("rlhf-train", *args, cwd=tmp_path / "one")
    assert r.returncode == 0, r.stderr[-3000:]
    r = ranks(*args, cwd=tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    one, _, rows_one = result(tmp_path / "one")
    two, summary, rows_two = result(tmp_path / "two")
    assert summary["data_parallel_ranks"] == 2 and summary["parallel"] == "fsdp"
    assert summary["max_eval_diff_across_ranks"] == 0.0  # every rank evaluated the same sharded model alike
    assert "max_param_diff_across_ranks" not in summary  # one copy: nothing to drift apart
    run = next((tmp_path / "two" / "outputs").rglob("summary.json")).parent
    step = run / "checkpoints" / "step_000010"
    assert sorted(p.name for p in (step / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (step / checkpoint.WEIGHTS).exists()  # the weights are in the shards, once
    # The samples are the same (response lengths equal, rewards to float rounding); losses,
    # rewards and KLs within 1e-5 over 10 steps. The weights to the noise Adam amplifies
    # (each entry's step is divided by its own running gradient scale, so an entry whose
    # gradient is near zero moves by a rounding-driven amount): measured 2.7e-4 after 10
    # steps; after 3, 7.6e-5, where DDP gives 8.2e-5. The largest weight is 1.4.
    assert_metrics_close(rows_one, rows_two, ("train/response_len",), 0.0)
    assert_metrics_close(rows_one, rows_two, ("train/reward", "loss/policy", "train/kl"), 1e-5)
    assert_metrics_close(rows_one, rows_two, ("eval/reward", "eval/kl"), 1e-5)
    assert max_diff(one, two) < 5e-4, max_diff(one, two)

    killed = kill_job_between_checkpoints(tmp_path / "killed", args, every=3)
    assert not (killed / "summary.json").exists()
    shard = killed / "checkpoints" / "step_000006" / "shards" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = ranks(f"resume={killed}", cwd=tmp_path / "killed")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "__1_0.distcp does not have the contents checkpoint.json lists" in r.stderr
    assert (killed / "checkpoints" / ".damaged-step_000006").is_dir()
    resumed = final_tensors(killed)
    assert resumed.keys() == two.keys() and all(torch.equal(resumed[k], two[k]) for k in two)
    assert deterministic_rows(killed / "metrics.jsonl") == deterministic_rows(run / "metrics.jsonl")


@pytest.mark.slow
def test_sharded_ppo_with_bf16_weights_and_an_fp32_value_head(tmp_path, embedded_dir):
    """Full fine-tuning of bf16 weights with PPO's fp32 value head: FSDP2 wants one dtype in
    a unit, so the head is a unit of its own (in the root's unit this run failed with "FSDP
    expects uniform original parameter dtype")."""
    r = ranks("optimizer=ppo", "policy.lora.enabled=false", "policy.dtype=bfloat16", "train.steps=2", *FSDP,
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    tensors, summary, rows = result(tmp_path)
    assert summary["parallel"] == "fsdp" and summary["max_eval_diff_across_ranks"] == 0.0
    assert [row["step"] for row in rows if "loss/value" in row] == [1, 2]
    assert tensors["value_head.safetensors:weight"].dtype == torch.float32
    assert tensors["model.safetensors:transformer.h.0.attn.c_attn.weight"].dtype == torch.bfloat16


def test_a_checkpoint_of_whole_tensors_is_refused_by_a_sharded_policy_naming_the_fix(embedded_dir):
    """What the trainer's restore calls with a checkpoint written by one process or DDP."""
    from rlhf.contracts.schema import PolicyConfig
    from rlhf.core.model.policy import CheckpointMismatch, Policy

    policy = Policy.load(PolicyConfig(path="embedded"), torch.device("cpu"))
    whole = {k: v.clone() for k, v in policy.trainable_state().items()}
    policy.load_trainable_state(whole)  # unsharded: it fits
    policy.sharded = True  # as enable_sharding leaves it (which needs several processes)
    with pytest.raises(CheckpointMismatch, match=r"holds whole tensors \(written by one process or parallel=ddp\), and "
                                                 r"this run is sharded \(parallel=fsdp\): resume it with parallel=ddp"):
        policy.load_trainable_state(whole)


def test_parallel_is_checked_before_any_model_loads(tmp_path):
    r = cli("rlhf-train", "parallel=zero3", cwd=tmp_path)
    assert r.returncode != 0
    assert "parallel" in r.stderr and "ddp" in r.stderr and "fsdp" in r.stderr


def test_the_blocks_are_the_models_own_unsplittable_layers(embedded_dir):
    from transformers import AutoModelForCausalLM

    from rlhf.core.parallel.sharding import blocks
    from rlhf.embedded.build import policy_path

    model = AutoModelForCausalLM.from_pretrained(policy_path())
    assert blocks(model) == list(model.transformer.h)
    model._no_split_modules = []
    with pytest.raises(ValueError, match="does not name its decoder blocks.*use parallel=ddp"):
        blocks(model)
