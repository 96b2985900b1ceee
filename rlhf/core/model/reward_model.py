"""Reward models: how one is loaded, what text it reads, and its scores. Trained by
`rlhf-train-rm` (rlhf.apps.train_rm); read, frozen, by the `learned_rm` reward plugin.

A reward model is an AutoModelForSequenceClassification with one label that reads
`text_of(prompt, response)`.
"""

from __future__ import annotations

import torch

MAX_TOKENS = 128  # a (prompt, response) text is cut to this many tokens


def text_of(prompt, response: str, tokenizer=None) -> str:
    """How a (prompt, response) is shown to the reward model, in training and in scoring:
    text prompts joined to the response by a space; a conversation rendered by the chat
    template with its generation prompt, the response right after it (a rollout's
    `RenderedText` query already is that rendering)."""
    from rlhf.core.rollout.data import RenderedText, render

    if isinstance(prompt, RenderedText) or (isinstance(prompt, str) and tokenizer is not None and any(
            t in prompt for t in tokenizer.all_special_tokens if t not in (tokenizer.eos_token, tokenizer.pad_token))):
        return prompt + response  # rendered already (a rollout's query, or a pair rlhf-label wrote)
    if isinstance(prompt, (list, tuple)):
        return render(tokenizer, list(prompt)) + response
    return f"{prompt} {response}"


def load_reward_model(path: str, device: torch.device | str, trust_remote_code: bool = False, **kwargs):
    """(model, tokenizer), right padding; `num_labels=1` starts a new one-logit head on a base."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if tokenizer.pad_token_id is None:  # GPT-2 style: pad with EOS; the head reads the last real token
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # a long text keeps its end: the head reads the last token
    return model.to(device), tokenizer


def rm_scores(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        out.append(model(**enc.to(device)).logits[:, 0].float())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, pairs) -> float:
    model.eval()
    chosen = rm_scores(model, tokenizer, [text_of(p.prompt, p.chosen, tokenizer) for p in pairs])
    rejected = rm_scores(model, tokenizer, [text_of(p.prompt, p.rejected, tokenizer) for p in pairs])
    return (chosen > rejected).float().mean().item()
