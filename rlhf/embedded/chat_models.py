"""Instruction-tuned model layouts, built offline with random weights: what a user brings.

`build_chat_model("llama", out)` saves a Llama-architecture causal LM laid out as Llama 3
Instruct is (untied embeddings, no pad token, a chat template with header tokens, a
generation config that ends on either `<|eot_id|>` or `<|end_of_text|>`);
`build_chat_model("qwen2", out)` one laid out as Qwen2 Instruct is (tied embeddings, a pad
token of its own, ChatML with `<|im_start|>`/`<|im_end|>`, generation ending on `<|im_end|>`
or `<|endoftext|>`). The trunk is tiny; the vocabulary can be the real one's size
(`vocab_size=128256` or `151936`), as the memory benchmark needs.

The tokenizer is a byte-level BPE trained here on the embedded review text (a few hundred
tokens) plus each family's special tokens; the model's embedding may have more rows than
the tokenizer has tokens, as Qwen2's does.
"""

from __future__ import annotations

import json
from pathlib import Path

# The chat templates are written here in each family's format (role headers, end-of-turn
# token, the generation prompt), not copied from the hub's files.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

FAMILIES = {
    "llama": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, ends=["<|eot_id|>", "<|end_of_text|>"],
        template=LLAMA_TEMPLATE, tied=False,
    ),
    "qwen2": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", ends=["<|im_end|>", "<|endoftext|>"],
        template=CHATML_TEMPLATE, tied=True,
    ),
}


def build_tokenizer(family: str, n_texts: int = 2000, bpe_size: int = 600, digits: bool = False):
    """A byte-level BPE tokenizer with `family`'s special tokens and chat template; with
    `digits`, every digit its own token (as Llama 3's and Qwen's tokenizers split numbers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf.embedded.corpus import reviews

    spec = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    texts = [t for t, _ in reviews(n_texts, seed=7)] + [f"{a} + {b} = {a + b}" for a in range(30) for b in range(30)]
    trainer = trainers.BpeTrainer(vocab_size=bpe_size, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                        pad_token=spec["pad"], model_max_length=512)
    tokenizer.chat_template = spec["template"]
    return tokenizer


def build_chat_model(family: str, out: str | Path, vocab_size: int | None = None, hidden: int = 64,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised `family` ("llama" or "qwen2") chat model and its tokenizer
    to `out`; the embedding has `vocab_size` rows (default: the tokenizer's size)."""
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: one of {sorted(FAMILIES)}")
    tokenizer = build_tokenizer(family)
    model = chat_model(family, tokenizer, vocab_size, hidden, layers, heads, kv_heads, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "built_by.json").write_text(json.dumps({"family": family, "vocab_size": model.config.vocab_size,
                                                   "hidden": hidden, "layers": layers, "seed": seed}) + "\n")
    return out


def chat_model(family: str, tokenizer, vocab_size: int | None = None, hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, seed: int = 0):
    """A randomly initialised `family` model for `tokenizer` (its end tokens in the generation config)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    spec = FAMILIES[family]
    vocab = max(vocab_size or 0, len(tokenizer))
    def ids(name):
        return tokenizer.convert_tokens_to_ids(name)
    ends = [ids(t) for t in spec["ends"]]
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                  tie_word_embeddings=spec["tied"], bos_token_id=ids(spec["bos"]) if spec["bos"] else None,
                  eos_token_id=ends[0] if family == "qwen2" else ids("<|end_of_text|>"),
                  pad_token_id=ids(spec["pad"]) if spec["pad"] else None)
    config = LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(config)
    model.generation_config = GenerationConfig(bos_token_id=common["bos_token_id"], eos_token_id=ends,
                                               pad_token_id=common["pad_token_id"], do_sample=True)
    return model
