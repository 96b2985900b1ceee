"""Data parallelism on torch.distributed: one process per device, started by torchrun or
`accelerate launch` (which set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT).

Every rank builds the same global batch of prompts and keeps its own slice of the rows, so
a run on N ranks samples what one process with the same global batch would; gradients are
averaged by DistributedDataParallel; batch statistics (advantage whitening, baselines, the
KL controller, logged metrics) are reduced across ranks. Rank 0 alone evaluates, logs and
writes checkpoints (sharded, parallel=fsdp, see rlhf.core.parallel.sharding: every rank evaluates and
writes its shards). With one process every function here is a no-op. Here too: which
device and which autocast precision this process uses.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def setup() -> None:
    """Join the process group the launcher describes: NCCL on GPUs, gloo on the CPU. In a
    submitit job of several tasks (hydra.launcher.tasks_per_node=N), submitit describes it."""
    if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks > 1:  # MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if env_world_size() <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend=backend)


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(name: str) -> torch.device:
    """auto: this rank's GPU if there is one (cuda:LOCAL_RANK when data-parallel), else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device={name!r} is not a device torch knows ({e}); use auto, cpu, cuda, cuda:<n> or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name}: no CUDA device is visible here (torch.cuda.is_available() is False); "
                         "use device=auto (the GPU when there is one) or device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0; use device=cuda:<0..{torch.cuda.device_count() - 1}>")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name}: no Apple GPU (MPS) is available here; use device=auto or device=cpu")
    return device


AUTO_BF16_PARAMS = 50_000_000  # precision=auto on a CPU: bf16 from this many parameters (docs, "Speed")


def bf16_units(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively: a GPU that supports it; a CPU with
    avx512_bf16 or AMX (as oneDNN reports it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    return _cpu_bf16_units()


@functools.cache
def _cpu_bf16_units() -> bool:
    """This machine's CPU (read once): Linux says which units it has (oneDNN's own check also
    says yes to AVX-512 without bf16); elsewhere, oneDNN's check."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_precision(name: str, device: torch.device, params: int = 0) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. auto: bf16 on a GPU that supports it, and on
    a CPU with bf16 units for a policy of at least AUTO_BF16_PARAMS parameters (where the step
    table measured it faster; smaller ones, the toys whose closed-form tables are exact in fp32
    included, stay fp32). Weights, gradients and the optimizer state stay fp32 (autocast
    computes matmuls in bf16 and keeps softmax, log-softmax and reductions in fp32); bf16
    needs no loss scaling."""
    if name == "fp32":
        return None
    if name == "auto":
        wins = device.type == "cuda" or (device.type == "cpu" and params >= AUTO_BF16_PARAMS)
        return torch.bfloat16 if wins and bf16_units(device) else None
    return torch.bfloat16


def is_main() -> bool:
    return rank() == 0


def shard(n: int) -> tuple[int, int]:
    """(start, stop) of this rank's rows of a global batch of n."""
    if n % world():
        raise ValueError(f"a global batch of {n} does not split evenly over {world()} processes; "
                         f"set train.batch_size to a multiple of {world()}")
    size = n // world()
    return rank() * size, (rank() + 1) * size


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a new tensor; autograd does not flow through it)."""
    if not active():
        return x
    x = x.detach().clone()
    torch.distributed.all_reduce(x)
    return x


def loss_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A token mean for a loss: this rank's sum over all ranks' token count, times the
    number of ranks, so that DDP's average of the gradients is the whole batch's token mean.
    With one process, the masked mean."""
    n = all_sum(mask.sum())
    return (x * mask).sum() / n.clamp(min=1) * world()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any: decisions that must agree (stop, skip)."""
    return bool(all_sum(torch.tensor(float(flag), device=device)) > 0)


def mean_metrics(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each metric averaged over ranks (every rank must log the same keys)."""
    if not active() or not metrics:
        return metrics
    keys = sorted(metrics)
    values = all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)) / world()
    return dict(zip(keys, values.tolist()))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def max_param_difference(tensors: dict[str, torch.Tensor]) -> float:
    """Largest |difference| between any rank's parameters and rank 0's (0 when they agree)."""
    if not active():
        return 0.0
    worst = torch.zeros((), dtype=torch.float64, device=next(iter(tensors.values())).device)
    for t in tensors.values():
        reference = t.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        worst = torch.maximum(worst, (t.detach() - reference).abs().max().double())
    torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
    return worst.item()
