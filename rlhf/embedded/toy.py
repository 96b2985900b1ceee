"""The toy problem's policy: a tiny randomly initialised GPT-2 over a word-level vocabulary
of one-token prompts x0..x{K-1} and one-token responses y0..y{V-1}.

Prompts and responses are single tokens, so pi(y|x) is one softmax and the optimum of the
KL-regularised objective can be computed exactly (`rlhf/optimum.py`). Built into the cache
like the embedded default; deterministic from its seed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

PAD = "<pad>"


def toy_vocab(n_prompts: int, n_responses: int) -> list[str]:
    return [PAD] + [f"x{i}" for i in range(n_prompts)] + [f"y{i}" for i in range(n_responses)]


def toy_policy_path(n_prompts: int = 2, n_responses: int = 6, seed: int = 0) -> str:
    """Directory of the toy policy (built on first use; under a second, well below a build's)."""
    from filelock import FileLock

    from rlhf.embedded.build import cache_root, own_random_state

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"toy-{n_prompts}x{n_responses}-seed{seed}"
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file() or not (target / "model.safetensors").is_file():
            shutil.rmtree(target, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
            try:
                with own_random_state():  # the run that builds it trains as every later run does
                    _build(tmp, n_prompts, n_responses, seed)
                tmp.replace(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _build(out: Path, n_prompts: int, n_responses: int, seed: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = toy_vocab(n_prompts, n_responses)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, model_max_length=8)
    torch.manual_seed(seed)
    # a large initialiser range gives a reference far from uniform, so pi* differs per prompt
    config = GPT2Config(vocab_size=len(vocab), n_positions=8, n_embd=16, n_layer=1, n_head=2,
                        initializer_range=0.5, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
