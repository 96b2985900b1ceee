"""The toy problems' policies: tiny randomly initialised GPT-2s over a word-level vocabulary
of one-token prompts x0..x{K-1}, response tokens y0..y{V-1} and, for sequence problems, an
EOS token `</s>`.

The vocabulary is small, so every response up to a short cap can be enumerated and the
optimum of the KL-regularised objective computed exactly (`rlhf/core/evaluation/optimum.py`). Built
into the cache like the embedded default; deterministic from its seed.

`policy.path` names one: `toy` (2 prompts, 6 response tokens, no EOS: every response runs
to the cap), or `toy:<prompts>x<tokens>[:eos][:heads<N>][:seed<N>]`, e.g. `toy:3x4:eos`. The
attention has 2 heads unless `heads<N>` says otherwise (`toy:3x4:eos:heads1`: one head of 32
dimensions, a size vLLM's CPU attention runs; the same weights, since a head count does not
change GPT-2's parameter shapes).
"""

from __future__ import annotations

import re
from pathlib import Path

PAD, EOS = "<pad>", "</s>"
SPEC = re.compile(r"toy(?::(\d+)x(\d+))?(:eos)?(?::heads(\d+))?(?::seed(\d+))?")


def is_toy(path: str) -> bool:
    return path == "toy" or path.startswith("toy:")


def resolve(path: str) -> str:
    """The directory of the toy model `path` names (see the module's docstring)."""
    m = SPEC.fullmatch(path)
    if not m or (path.startswith("toy:") and not m.group(1) and not m.group(3)):
        raise ValueError(f"policy.path={path}: a toy model is named toy or toy:<prompts>x<tokens>[:eos][:heads<N>]"
                         "[:seed<N>], e.g. toy:3x4:eos")
    prompts, tokens = (int(m.group(1)), int(m.group(2))) if m.group(1) else (2, 6)
    if not (1 <= prompts <= 100 and 1 <= tokens <= 1000):
        raise ValueError(f"policy.path={path}: between 1 and 100 prompts and 1 and 1000 response tokens")
    heads = int(m.group(4) or 2)
    if heads not in (1, 2, 4, 8, 16) or heads > (32 if m.group(3) else 16):
        raise ValueError(f"policy.path={path}: heads{heads} does not divide the toy's width (32 with :eos, else 16): "
                         "1, 2, 4, 8 or 16 heads")
    return toy_policy_path(prompts, tokens, int(m.group(5) or 0), eos=bool(m.group(3)), heads=heads)


def toy_vocab(n_prompts: int, n_responses: int, eos: bool = False) -> list[str]:
    """With EOS, the EOS is also the padding (as GPT-2's): a sampled padding token stops the
    response instead of vanishing from the decoded text."""
    body = [f"x{i}" for i in range(n_prompts)] + [f"y{i}" for i in range(n_responses)]
    return body + [EOS] if eos else [PAD] + body


def toy_policy_path(n_prompts: int = 2, n_responses: int = 6, seed: int = 0, eos: bool = False, heads: int = 2) -> str:
    """Directory of the toy policy (built on first use; under a second, well below a build's)."""
    from rlhf.embedded.build import cached_model

    name = f"toy-{n_prompts}x{n_responses}{'-eos' if eos else ''}{f'-heads{heads}' if heads != 2 else ''}-seed{seed}"
    return cached_model(name, lambda out: _build(out, n_prompts, n_responses, seed, eos, heads))


def _build(out: Path, n_prompts: int, n_responses: int, seed: int, eos: bool, heads: int = 2) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = toy_vocab(n_prompts, n_responses, eos)
    pad = EOS if eos else PAD
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=pad))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=EOS if eos else None,
                                        model_max_length=16 if eos else 8)
    torch.manual_seed(seed)
    eos_id = len(vocab) - 1 if eos else None
    # a large initialiser range gives a reference far from uniform, so pi* differs per prompt;
    # sequence problems get a wider, deeper model, whose next-token distributions depend on
    # the prefix, at a smaller range (0.5 put 80% of a prompt's mass on one response)
    width = (dict(n_embd=32, n_layer=2, n_positions=16, initializer_range=0.2) if eos
             else dict(n_embd=16, n_layer=1, n_positions=8, initializer_range=0.5))
    config = GPT2Config(vocab_size=len(vocab), n_head=heads, bos_token_id=None, eos_token_id=eos_id,
                        pad_token_id=vocab.index(pad), **width)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
