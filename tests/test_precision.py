"""Mixed precision: bf16 autocast, chosen automatically on GPUs and, from 50M parameters, on
CPUs with bf16 units; available on any CPU.

The CPU runs bf16 autocast for real, so the code path is tested on every machine; the
GPU-only choice of `precision=auto` is checked where a CUDA device is present.
"""

import json

import pytest
import torch
from conftest import cli

from rlhf.core.parallel.distributed import pick_precision


def test_auto_on_the_cpu_is_bf16_for_large_policies_on_bf16_units_only(monkeypatch):
    """Small policies (the toys, whose closed-form tables are exact in fp32, the embedded
    models) stay fp32; from AUTO_BF16_PARAMS parameters a CPU with bf16 units trains in bf16
    (the step table: 2.2x faster at 87M), one without stays fp32."""
    from rlhf.core.parallel import distributed

    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) is None and pick_precision("auto", cpu, 544_256) is None
    big = distributed.AUTO_BF16_PARAMS
    assert pick_precision("auto", cpu, big) is (torch.bfloat16 if distributed.bf16_units(cpu) else None)
    assert pick_precision("fp32", cpu, big) is None
    assert pick_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(distributed, "bf16_units", lambda device: False)  # a CPU without them
    assert pick_precision("auto", cpu, big) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is present")
def test_auto_is_bf16_on_a_gpu_that_supports_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    assert pick_precision("auto", torch.device("cuda:0")) is expected


@pytest.mark.slow
def test_bf16_ppo_run_starts_at_the_reference_and_trains(tmp_path, embedded_dir):
    """Old log-probs are recomputed on the update's path under autocast, so the first PPO
    epoch sees ratio 1 (approx_kl 0) and the policy starts exactly at the reference."""
    r = cli("rlhf-train", "optimizer=ppo", "precision=bf16", "train.steps=2", "train.batch_size=8", "data.n_eval=4",
            "eval.every=100", "sampler.max_new_tokens=12", "threads=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = next((tmp_path / "outputs").rglob("summary.json")).parent
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bfloat16" and summary["device"] == "cpu"
    assert summary["kl_start"] == 0.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "policy/approx_kl" in row]
    assert len(train) == 2 and all(abs(row["policy/approx_kl"]) < 1e-3 for row in train)
    assert summary["kl_end"] > 0.01  # it did move away from the reference
