"""The torch optimizer and the gradient step every optimizer plugin takes."""

from __future__ import annotations

import torch

from rlhf.core.parallel import sharding


def adam(params: list, lr: float, eps: float = 1e-8) -> torch.optim.Adam:
    """Adam over `params`, fused into one kernel where torch has one for their device (CPU and
    CUDA): one call per step instead of a loop over tensors, the same update."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=fused or None)


def gradient_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """zero_grad, backward, clip the gradient norm (<= 0: no clipping), step; returns the norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    opt.step()
    return sharding.replicated(grad_norm)  # sharded weights: the norm of the whole gradient, held by every rank
