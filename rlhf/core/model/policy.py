"""The policy: a causal LM, LoRA adapters, a value head on the shared trunk, and the reference.

With LoRA the reference is the same module with its adapters switched off, so one copy of
the base weights serves both; with LoRA off it is a frozen deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from rlhf.contracts.errors import Refused
from rlhf.contracts.schema import LoraSettings, PolicyConfig
from rlhf.core.model.logprobs import Trunk, position_ids, response_logits
from rlhf.core.model.pretrained import (
    TrainedParts,
    apply_chat_template,
    base_model,
    from_pretrained,
    load_model,
    lora_targets,
    quiet_peft,
    ready,
    trained_parts,
)
from rlhf.core.parallel import distributed, sharding
from rlhf.core.toolkit import numerics


class Policy:
    """Causal LM (+ adapters) with an optional value head; computes log-probs for the core."""

    def __init__(self, model: nn.Module, tokenizer, lora: bool, device: torch.device, ref_model: nn.Module | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora
        self.device = device
        self.value_head: nn.Linear | None = None
        self._ref_model: nn.Module | None = None
        self._keeps_logits: bool | None = None  # does the model's forward take logits_to_keep
        self._chunked: bool | None = None  # log-probs through the chunked vocabulary projection
        self._chunk_checked = False  # the chunked path compared with the model's own logits once
        self._ddp: nn.Module | None = None  # DistributedDataParallel over model + value head, when data-parallel
        self._local: Trunk | None = None  # the trainable forward; sharded in place under parallel=fsdp
        self._ref_root: Trunk | None = None  # the frozen reference copy's, sharded, under parallel=fsdp
        self.sharded = False  # weights, gradients and optimizer state sharded over the ranks (parallel=fsdp)
        self.trunk = ""  # what the adapters sit on, as a policy.path value (recorded with them)
        self.started_from: TrainedParts | None = None  # the trained run this policy goes on from
        if ref_model is not None:
            self._ref_model = ref_model
        elif not lora:  # a full copy, frozen: the price LoRA avoids
            self._ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # ---------------------------------------------------------------- construction

    @classmethod
    def load(cls, cfg: PolicyConfig, device: torch.device) -> Policy:
        """The policy `cfg.path` names, ready to train: a model (hub name, directory, "embedded",
        "toy...") with fresh adapters, or a trained run (its directory or its final/) from where
        it ended. For a trained run, `cfg.reference` says what the KL anchors at: "base", the
        model the run started from (its adapters go on training on it), or "start", the trained
        policy itself (adapters merged, fresh ones on top)."""
        parts = trained_parts(cfg.path)
        if parts is None:
            model, tokenizer = from_pretrained(cfg)
            policy = cls.from_model(model, tokenizer, cfg.lora, device)
            policy.trunk = cfg.path
        elif parts.adapters is not None and cfg.lora.enabled and cfg.reference == "base":
            from peft import PeftModel

            trunk, tokenizer = load_model(parts.trunk, cfg, tokenizer_from=parts.adapters)
            with quiet_peft():
                model = PeftModel.from_pretrained(trunk, str(parts.adapters), is_trainable=True)
            policy = cls(ready(model, tokenizer, device), tokenizer, True, device)
            policy.trunk = parts.trunk
        else:  # merged weights, then fresh adapters (or full fine-tuning) on them
            model, tokenizer = load_model(cfg.path, cfg)
            ref = None
            if cfg.reference == "base":
                ref, _ = load_model(parts.trunk, cfg)
                ref = ready(ref, tokenizer, device).eval().requires_grad_(False)
            policy = cls.from_model(model, tokenizer, cfg.lora, device, ref_model=ref)
            policy.trunk = str(Path(cfg.path).expanduser().resolve())
        policy.started_from = parts
        if not cfg.chunked_logprobs:
            policy._chunked = False
        apply_chat_template(policy.tokenizer, cfg.chat_template)
        if cfg.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        return policy

    @classmethod
    def load_trained(cls, cfg: PolicyConfig, device: torch.device) -> Policy:
        """A policy to sample from: `cfg.path` may also be a run directory of rlhf-train or its
        final/ (the trained policy, never the base it started from)."""
        from dataclasses import replace

        parts = trained_parts(cfg.path)
        if parts is not None:  # the trained adapters as they are (no merge), or the trained weights (no base copy)
            cfg = (replace(cfg, reference="base", lora=replace(cfg.lora, enabled=True)) if parts.adapters is not None
                   else replace(cfg, reference="start"))
        return cls.load(cfg, device)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, lora: LoraSettings, device: torch.device,
                   ref_model: nn.Module | None = None) -> Policy:
        """`model` with fresh adapters (or all its weights trainable); the reference is `ref_model`
        if given, else the model itself with the adapters off (or a frozen copy of it)."""
        model = ready(model, tokenizer, device)
        if lora.enabled:
            from peft import LoraConfig, get_peft_model

            peft_cfg = LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora_targets(model, lora.target_modules), task_type="CAUSAL_LM",
            )
            with quiet_peft():
                model = get_peft_model(model, peft_cfg)
        return cls(model, tokenizer, lora.enabled, device, ref_model)

    def attach_value_head(self) -> None:
        """A linear value head on the last hidden state of the (adapted) trunk: the trained
        run's, when this policy goes on from one that had a critic."""
        self.value_head = nn.Linear(self.model.config.hidden_size, 1).to(self.device)
        nn.init.zeros_(self.value_head.weight)  # V = 0 until the critic has learned something
        nn.init.zeros_(self.value_head.bias)
        saved = self.started_from.value_head if self.started_from is not None else None
        if saved is not None:
            from safetensors.torch import load_file

            state = load_file(str(saved))
            if all(state.get(k) is not None and state[k].shape == v.shape for k, v in self.value_head.state_dict().items()):
                self.value_head.load_state_dict(state)

    def enable_gradient_checkpointing(self) -> None:
        """Activations recomputed in backward instead of kept (the inputs require grad so that
        the recomputed segments see the adapters' gradients)."""
        base = base_model(self.model)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False

    @property
    def eos_ids(self) -> list[int]:
        """Every token that ends a response: the tokenizer's EOS and each of the generation
        config's (Llama 3 ends a turn with <|eot_id|> or <|end_of_text|>, Qwen with <|im_end|>)."""
        return eos_ids(self.model, self.tokenizer)

    # ---------------------------------------------------------------- parameters

    def parameter_count(self) -> int:
        """The model's own weights (adapters and the value head left out): its size."""
        return sum(p.numel() for n, p in self.model.named_parameters() if "lora_" not in n)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from (p for p in self.model.parameters() if p.requires_grad)
        if self.value_head is not None:
            yield from self.value_head.parameters()

    def train(self) -> None:
        self.model.train()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by name (adapters, or all weights, and the value head),
        sharing storage with the parameters (sharded: DTensors, each rank holding its part)."""
        out = {f"model.{n}": p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        if self.value_head is not None:
            out.update({f"value_head.{n}": p.detach() for n, p in self.value_head.named_parameters()})
        return out

    @torch.no_grad()
    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's tensors in, after checking that every one has this policy's
        name, shape and dtype (CheckpointMismatch names the first that do not)."""
        if self.sharded:
            raise CheckpointMismatch("this checkpoint holds whole tensors (written by one process or parallel=ddp), "
                                     "and this run is sharded (parallel=fsdp): resume it with parallel=ddp, its layout")
        current = self.trainable_state()
        if set(tensors) != set(current):
            missing, unexpected = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
            raise CheckpointMismatch(f"checkpoint does not fit this policy: missing {missing[:5]}, unexpected {unexpected[:5]} "
                                     "(was it written with other policy.lora settings or another optimizer?)")
        wrong = [f"{name}: checkpoint {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}, policy "
                 f"{tuple(current[name].shape)} {str(current[name].dtype).removeprefix('torch.')}"
                 for name, t in tensors.items() if t.shape != current[name].shape or t.dtype != current[name].dtype]
        if wrong:
            raise CheckpointMismatch(f"checkpoint tensors do not fit this policy ({len(wrong)} of {len(tensors)}): "
                                     + "; ".join(wrong[:3]))
        for name, t in tensors.items():
            current[name].copy_(t)

    # ---------------------------------------------------------------- forward passes

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int, with_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits predicting each response token, and the value of the state before it.

        input_ids: (B, Q + T) -> logits (B, T, V), values (B, T) or None
        """
        return self._trunk(input_ids, attention_mask, query_len, with_values, self.keeps_logits)

    def token_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int, temperature: float = 1.0,
        with_values: bool = True, with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """log pi(y_t | x, y_<t) of each response token at `temperature`, the value of the state
        before it, and the entropy of pi there: (B, T), (B, T) or None, (B, T) or None.

        The vocabulary projection runs on a few thousand positions at a time, each chunk under
        activation checkpointing, so no (B, T, V) tensor is ever held (the backward pass
        recomputes a chunk's logits): peak memory stays flat as the vocabulary grows. Models
        that scale or cap their logits (Gemma 2, Cohere, Granite) and `chunked_logprobs=False`
        take the full logits."""
        if not self.chunked:  # (checked before the first chunked call: _check_chunked)
            logits, values = self.forward(input_ids, attention_mask, query_len, with_values)
            tokens = input_ids[:, query_len:]
            entropy = numerics.entropy_from_logits(logits, temperature) if with_entropy else None
            return numerics.logprobs_of(logits, tokens, temperature), values, entropy
        if not self._chunk_checked:
            self._check_chunked(input_ids[:1], attention_mask[:1], query_len)
            if not self.chunked:
                return self.token_logprobs(input_ids, attention_mask, query_len, temperature, with_values, with_entropy)
        return self._trunk(input_ids, attention_mask, query_len, with_values, self.keeps_logits,
                           stats=(temperature, with_entropy))

    def _trunk(self, *args, **kwargs):
        """The trainable forward: through DDP when training data-parallel. Sharded and without
        autograd, the root's weights are freed after it (FSDP2 keeps a root's weights gathered
        from its forward to its backward, and without autograd there is none)."""
        if self._ddp is not None and torch.is_grad_enabled():
            return self._ddp(*args, **kwargs)
        if self.sharded and not torch.is_grad_enabled():
            with sharding.gathered(self._local):
                return self._local(*args, **kwargs)
        return self._local_trunk()(*args, **kwargs)

    @torch.no_grad()
    def _check_chunked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int) -> None:
        """Once, on one row: the chunked projection must give the model's own log-probs (an
        architecture that scales its logits in a way not listed would otherwise be silently
        wrong); if not, the full logits from then on, said once."""
        self._chunk_checked = True
        logits, _ = self.forward(input_ids, attention_mask, query_len, with_values=False)
        full = numerics.logprobs_of(logits, input_ids[:, query_len:])
        chunked = self._trunk(input_ids, attention_mask, query_len, False, self.keeps_logits, stats=(1.0, False))[0]
        differs = not torch.allclose(full, chunked, atol=1e-3, rtol=1e-3)
        if self.sharded:  # every rank must take the same path (ranks in step: under DDP rank 0 evaluates alone)
            differs = distributed.any_rank(differs, full.device)
        if differs:
            self._chunked = False
            warnings.warn(f"{type(self.model).__name__}: the chunked log-probs differ from the model's own logits "
                          f"(by {float((full - chunked).abs().max()):.3g} nats: it transforms its logits after the output "
                          "layer); using the full logits", stacklevel=3)

    @torch.no_grad()
    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int,
                           temperature: float = 1.0) -> torch.Tensor:
        """log pi_ref of each response token at `temperature`. (B, T); chunked as token_logprobs."""
        if not self._chunk_checked and self.chunked:
            self._check_chunked(input_ids[:1], attention_mask[:1], query_len)
        if not self.chunked:
            return numerics.logprobs_of(self.reference_logits(input_ids, attention_mask, query_len),
                                        input_ids[:, query_len:], temperature)
        with self.reference() as ref:
            return Trunk(ref, None)(input_ids, attention_mask, query_len, False, self.keeps_logits,
                                     stats=(temperature, False))[0]

    @property
    def chunked(self) -> bool:
        """Whether log-probs come through the chunked vocabulary projection (see token_logprobs)."""
        if self._chunked is None:
            base = base_model(self.model)
            config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
            scaled = any(getattr(config, key, None) not in (None, 1, 1.0)
                         for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                                     "lm_head_multiplier"))
            self._chunked = not scaled and base.get_output_embeddings() is not None and bool(
                getattr(base, "base_model_prefix", "")) and hasattr(base, base.base_model_prefix)
        return self._chunked

    @chunked.setter
    def chunked(self, on: bool) -> None:
        """Force the path (the chunked projection against the whole-vocabulary one: tests and
        benchmarks compare them)."""
        self._chunked = bool(on)

    @property
    def reference_model(self) -> nn.Module | None:
        """The frozen reference's own copy (LoRA off, or a reference other than the base); None
        when the reference is the policy's base with its adapters switched off."""
        return self._ref_model

    def _local_trunk(self) -> Trunk:
        if self._local is None or self._local.value_head is not self.value_head:
            self._local = Trunk(self.model, self.value_head)
        return self._local

    def enable_sharding(self, device: torch.device, param_dtype: torch.dtype | None = None) -> None:
        """Shard the weights, gradients and optimizer state over the ranks with FSDP2 (see
        rlhf.core.parallel.sharding): the trainable forward (and the frozen reference copy, without
        LoRA) block by block, each rank's shards moved to `device` (load the policy on the
        CPU: the whole model then never has to fit the device). Call after the value head is
        attached, before the optimizer is built (it must hold the sharded parameters)."""
        self.device = device
        # the value head is a unit of its own: it is float32 whatever the model's dtype, and FSDP2
        # wants one dtype in a unit
        heads = (self.value_head,) if self.value_head is not None else ()
        self._local = sharding.shard(Trunk(self.model, self.value_head), self.model, device, param_dtype, heads)
        self._local.returns_copies = True
        self.sharded = True
        if self._ref_model is not None:
            self._ref_root = sharding.shard(Trunk(self._ref_model, None), self._ref_model, device, param_dtype)
            self._ref_root.returns_copies = True
        # one pass through each root first: FSDP2 learns which unit is the root on the first
        # forward it sees, and sampling (which starts a run) calls the blocks directly
        # (then every unit back to its shards: the parameters the optimizer is built on)
        ids = torch.zeros(1, 2, dtype=torch.long, device=self.device)
        with torch.no_grad():
            for root in (self._local, self._ref_root):
                if root is not None:
                    root(ids, torch.ones_like(ids), 1, False, self.keeps_logits)
                    sharding.resharded(root)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Around a sampling loop that calls the model directly: sharded, every weight gathered
        for its length (see rlhf.core.parallel.sharding.gathered)."""
        with sharding.gathered(self._local, everything=True) if self.sharded else contextlib.nullcontext():
            yield

    def trainable_root(self) -> nn.Module:
        """The module that holds every trained weight (the model and the value head, with
        their names in checkpoints): what FSDP shards and DCP saves."""
        return self._local_trunk()

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """Sharded: every trained weight (adapters, or all weights, and the value head), whole,
        on rank 0 (empty on the others; every rank must call it). None when not sharded."""
        return sharding.full_state(self._local) if self.sharded else None

    def enable_data_parallel(self) -> None:
        """Route training forwards through DistributedDataParallel, which averages the
        gradients of every rank in backward(). Sampling and the reference stay local."""
        from torch.nn.parallel import DistributedDataParallel

        trunk = Trunk(self.model, self.value_head)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(trunk, device_ids=ids)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
        with self.reference() as ref:
            out = ref(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      use_cache=False, **self._response_logits_only(input_ids, query_len))
        return response_logits(out.logits, input_ids, query_len)

    @property
    def context_length(self) -> int | None:
        """Positions the model can attend over, if its config says."""
        config = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
        return None

    @property
    def vocab_size(self) -> int:
        """Tokens the model can produce: the rows of its output layer."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def keeps_logits(self) -> bool:
        """Whether the model's forward takes `logits_to_keep` (most transformers causal LMs)."""
        if self._keeps_logits is None:
            import inspect

            base = base_model(self.model)
            self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._keeps_logits

    @property
    def cache_argument(self) -> str:
        """The name the model's forward takes its KV cache by, and returns it under: `cache` from
        transformers 5.2x (which deprecates `past_key_values`, removed in 5.40), else `past_key_values`."""
        import inspect

        base = base_model(self.model)
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def _response_logits_only(self, input_ids: torch.Tensor, query_len: int) -> dict:
        """Ask for the logits of the last T + 1 positions only: the query's rows of the
        vocabulary projection are never computed."""
        return {"logits_to_keep": input_ids.shape[1] - query_len + 1} if self.keeps_logits else {}

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference model: adapters disabled on the same weights, or the frozen copy
        (sharded: its root unit's weights gathered while it is in use)."""
        gather = contextlib.nullcontext()
        if self.sharded:
            gather = sharding.gathered(self._ref_root if self._ref_model is not None else self._local)
        if self._ref_model is not None:
            with gather:
                yield self._ref_model
        else:
            with gather, self.model.disable_adapter():
                yield self.model

    # ---------------------------------------------------------------- saving


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return sorted(ids)


class CheckpointMismatch(Refused, ValueError):
    """A checkpoint's tensors do not have this policy's names, shapes or dtypes."""


