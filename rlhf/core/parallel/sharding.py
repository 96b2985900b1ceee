"""Sharded data parallelism (`parallel=fsdp`): PyTorch's FSDP2 (`fully_shard`).

Each rank keeps 1/N of every weight, gradient and Adam moment. A layer's weights are
all-gathered just before it runs and freed after; gradients are reduce-scattered, so each
rank ends a backward pass with its shard of the averaged gradient.

How the policy is cut: every decoder block (transformers' `_no_split_modules`: the layers a
model must not be split inside) is one unit; the embeddings, final norm, output layer and
value head form the root unit, which is the policy's trainable forward (`_Trunk`). LoRA's
frozen base weights and trainable adapters share units: FSDP2 shards each parameter on its
own, so mixed requires_grad inside a unit is allowed (FSDP1 needed use_orig_params=True).

Every pass through the model is collective: all ranks must make it, the same number of
times. Training forwards go through the root's forward. Sampling and reference passes call
the model's parts directly, so they run inside `gathered(...)`: the root's weights are
gathered around them, and for sampling every block's too, kept for the whole sampling loop
(one all-gather per `generate` instead of one per layer per token; the cost is one full copy
of the weights while sampling, what DDP holds all the time). A rank's sampling loop then
makes no collective call at all, so ranks whose responses end at different lengths never
wait on each other.

Checkpoints are `torch.distributed.checkpoint` (DCP) directories: each rank writes its
shards, and they load onto any number of processes (DCP reshards on load), sharded or not.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from rlhf.core.model.pretrained import base_model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: modules of the classes its `_no_split_modules` names (the
    outermost, when one such class sits inside another)."""
    base = base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    found, taken = [], []
    for name, module in base.named_modules():
        if type(module).__name__ in names and not any(name.startswith(prefix + ".") for prefix in taken):
            found.append(module)
            taken.append(name)
    if not found:
        raise ValueError(f"parallel=fsdp: {type(base).__name__} does not name its decoder blocks (transformers' "
                         "_no_split_modules is empty), so there is nothing to shard layer by layer; use parallel=ddp")
    return found


def shard(root: nn.Module, model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None,
          own_units: tuple[nn.Module, ...] = ()) -> nn.Module:
    """`fully_shard` every block of `model` and each of `own_units`, then `root` (which holds
    them all) over all ranks; each rank's shards go to `device` (the weights may arrive on the
    CPU: each unit moves to the device whole and is cut there, so the device never holds more
    than one unit beyond the shards). With `param_dtype`, weights are gathered in that dtype
    (FSDP2's MixedPrecisionPolicy; the activations stay as autocast makes them) and gradients
    reduced in float32. `root` is returned, sharded in place."""
    from torch.distributed import get_world_size
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (get_world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
          if param_dtype else MixedPrecisionPolicy())
    for block in [*blocks(model), *own_units]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)
    return root


@contextlib.contextmanager
def gathered(root: nn.Module, everything: bool = False) -> Iterator[None]:
    """The root unit's weights gathered for passes that do not go through its forward (its
    blocks still gather themselves, one at a time); with `everything`, every block's too, and
    kept until the end (for the sampling loop)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root] if everything else []
    try:
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        for unit in [root, *units]:
            unit.unshard()
        yield
    finally:
        for unit in [root, *units]:
            unit.reshard()
        for unit in units:
            unit.set_reshard_after_forward(True, recurse=False)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (the tensor itself when it is not sharded)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def replicated(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor that every rank holds whole (a reduced norm); else `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained weight of `module` whole (adapters, or all weights), on the CPU, on rank 0
    (an empty dict elsewhere); a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(resharded(module), options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=True))


def resharded(root: nn.Module) -> nn.Module:
    """`root` with every unit's weights back to their shards: the parameters the optimizer
    holds are then the ones registered on the modules (a forward with no backward after it,
    such as a skipped update, leaves them gathered)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in root.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()
    return root


def _state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    resharded(root)

    model, optim = get_state_dict(root, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model, "optim": optim}


def save(root: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The trained weights (frozen ones left out) and the optimizer's state, each rank its own
    shards; a collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state(root, optimizer), checkpoint_id=str(directory))


def load(root: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """What `save` wrote, onto this layout (any number of ranks, sharded or not). Raises
    KeyError (or DCP's own error) when the checkpoint holds other trained tensors than this
    policy, more or fewer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state(root, optimizer)
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    unexpected = sorted({k.split(".", 1)[1] for k in saved if k.startswith("model.")} - set(state["model"]))
    if unexpected:  # (a tensor this policy lacks would otherwise be left out without a word)
        raise KeyError(f"the checkpoint holds tensors this policy does not train: {unexpected[:3]}")
    dcp.load(state, checkpoint_id=str(directory))
    # not strict: the frozen weights are not in it (DCP's load has already refused a checkpoint
    # that lacks any tensor asked for)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
