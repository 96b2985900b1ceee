"""The gradient step every optimizer plugin takes."""

from __future__ import annotations

import torch


def gradient_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """zero_grad, backward, clip the gradient norm (<= 0: no clipping), step; returns the norm before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    opt.step()
    return grad_norm
