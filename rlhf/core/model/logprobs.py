"""The log-prob maths of the policy: its trainable forward as one module (`Trunk`: the LM and
its value head, what DDP wraps and FSDP2 shards as its root), the log-probs of response
tokens through a vocabulary projection taken a chunk of positions at a time, and the
position ids that skip left padding."""

from __future__ import annotations

import torch
from torch import nn

from rlhf.core.model.pretrained import base_model


class Trunk(nn.Module):
    """The policy's trainable forward as one module (the LM and its value head), so that
    DistributedDataParallel can wrap it, or FSDP2 shard it as its root."""

    returns_copies = False  # set on the sharded trunk

    def __init__(self, model: nn.Module, value_head: nn.Module | None):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, input_ids, attention_mask, query_len: int, with_values: bool, keeps_logits: bool,
                stats: tuple[float, bool] | None = None):
        """(logits (B, T, V), values); with `stats=(temperature, with_entropy)`, (log-probs,
        values, entropy) of the response tokens through the chunked projection instead."""
        out = self._forward(input_ids, attention_mask, query_len, with_values, keeps_logits, stats)
        if self.returns_copies:  # FSDP2 hooks its backward gather on the outputs, which an in-place op on a view would lose
            out = tuple(None if x is None else x.clone() for x in out)
        return out

    def _forward(self, input_ids, attention_mask, query_len: int, with_values: bool, keeps_logits: bool,
                 stats: tuple[float, bool] | None):
        if stats is not None:
            return self._token_stats(input_ids, attention_mask, query_len, with_values, *stats)
        keep = {"logits_to_keep": input_ids.shape[1] - query_len + 1} if keeps_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                         output_hidden_states=with_values, use_cache=False, **keep)
        logits = response_logits(out.logits, input_ids, query_len)
        values = None
        if with_values and self.value_head is not None:
            hidden = out.hidden_states[-1][:, query_len - 1 : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values


    def _token_stats(self, input_ids, attention_mask, query_len: int, with_values: bool, temperature: float,
                     with_entropy: bool):
        base = base_model(self.model)
        decoder = getattr(base, base.base_model_prefix)  # the trunk without its head (adapters inside)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      use_cache=False)
        hidden = out.last_hidden_state[:, query_len - 1 : -1]  # (B, T, H): the states that predict y_0..y_{T-1}
        values = None
        if with_values and self.value_head is not None:
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        logprobs, entropy = chunked_token_stats(base.get_output_embeddings(), hidden, input_ids[:, query_len:],
                                                temperature, with_entropy)
        return logprobs, values, entropy


LOGITS_PER_CHUNK = 2**22  # elements of one chunk's logits (rows x vocabulary): 16 MB in float32


def chunked_token_stats(head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float,
                        with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden) / temperature) at `tokens`, and the entropy, a chunk of
    positions at a time; under autograd each chunk is checkpointed, so its logits are freed
    at once and recomputed in backward (when one chunk holds every position there is nothing
    to free early, and it runs as it is). (B, T, H), (B, T) -> (B, T), (B, T) or None"""
    from torch.utils.checkpoint import checkpoint

    B, T, H = hidden.shape
    rows = max(1, LOGITS_PER_CHUNK // int(head.weight.shape[0]))
    flat_h, flat_y = hidden.reshape(B * T, H), tokens.reshape(B * T)

    def chunk(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()  # (rows, V)
        if temperature != 1.0:
            logits = logits / temperature
        lse = logits.logsumexp(-1)
        logp = logits.gather(-1, y[:, None]).squeeze(-1) - lse
        ent = lse - (logits.softmax(-1) * logits).sum(-1) if with_entropy else lse.new_zeros(())
        return logp, ent

    grad = B * T > rows and torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    # the reentrant form recomputes and backpropagates one chunk at a time and frees it at once;
    # the non-reentrant form kept every chunk's recomputed logits to the end of backward (measured:
    # 576 MiB at vocabulary 32k against 81 MiB) but is the one that reaches the head's own
    # parameters when the hidden states need no gradient, and the one DistributedDataParallel
    # allows when a trained head (an adapter on it) is used in every chunk
    trained_head = any(p.requires_grad for p in head.parameters())
    reentrant = hidden.requires_grad and not (trained_head and torch.distributed.is_available()
                                              and torch.distributed.is_initialized())
    parts = [checkpoint(chunk, flat_h[s : s + rows], flat_y[s : s + rows], use_reentrant=reentrant) if grad
             else chunk(flat_h[s : s + rows], flat_y[s : s + rows]) for s in range(0, B * T, rows)]
    logprobs = torch.cat([p[0] for p in parts]).view(B, T)
    entropy = torch.cat([p[1] for p in parts]).view(B, T) if with_entropy else None
    return logprobs, entropy


def response_logits(logits: torch.Tensor, input_ids: torch.Tensor, query_len: int) -> torch.Tensor:
    """(B, T, V): the logits predicting response tokens 0..T-1, from the full sequence's logits
    or from the last T + 1 positions' (logits_to_keep)."""
    T = input_ids.shape[1] - query_len
    return logits[:, -T - 1 : -1]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them: 0 at the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
