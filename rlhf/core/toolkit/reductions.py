"""The one reduction rule of a loss, under data parallelism and sharding as in one process: a
token mean over every rank's tokens (`token_mean`) or a mean over every rank's rows
(`row_mean`), each scaled so that the gradient DDP averages (FSDP reduce-scatters) is the
global batch's, however ragged the responses; with one process each is the plain mean, to
the bit."""

from __future__ import annotations

import torch

from rlhf.core.parallel import distributed
from rlhf.core.toolkit import numerics


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The loss's token mean over the global batch: this rank's masked sum over every rank's
    token count, times the number of ranks (DDP averages the gradients). One process: the
    masked mean. (b, T), (b, T) -> ()"""
    if not distributed.active():
        return numerics.masked_mean(x, mask)
    return distributed.loss_mean(x, mask)


def row_mean(x: torch.Tensor) -> torch.Tensor:
    """The loss's mean over the global batch's rows (responses, pairs), as token_mean. (b,) -> ()"""
    if not distributed.active():
        return x.mean()
    n = distributed.all_sum(torch.tensor(float(x.numel()), device=x.device))
    return x.sum() / n.clamp(min=1) * distributed.world()
