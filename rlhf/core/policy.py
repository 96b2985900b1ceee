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

from rlhf.contracts.schema import LoraSettings, PolicyConfig
from rlhf.core import distributed, numerics, sharding
from rlhf.core.trained import BASE_RECORD, TrainedParts, from_pretrained, load_model, portable_name, quiet_peft, trained_parts


class Policy:
    """Causal LM (+ adapters) with an optional value head; computes log-probs for the core."""

    def __init__(self, model: nn.Module, tokenizer, lora: bool, device: torch.device, ref_model: nn.Module | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora
        self.device = device
        self.value_head: nn.Linear | None = None
        self.temperature = 1.0  # the run's sampling temperature (the trainer sets it): log pi of samples is taken at it
        self._ref_model: nn.Module | None = None
        self._keeps_logits: bool | None = None  # does the model's forward take logits_to_keep
        self._chunked: bool | None = None  # log-probs through the chunked vocabulary projection
        self._chunk_checked = False  # the chunked path compared with the model's own logits once
        self._ddp: nn.Module | None = None  # DistributedDataParallel over model + value head, when data-parallel
        self._local: _Trunk | None = None  # the trainable forward; sharded in place under parallel=fsdp
        self._ref_root: _Trunk | None = None  # the frozen reference copy's, sharded, under parallel=fsdp
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
            policy = cls(_ready(model, tokenizer, device), tokenizer, True, device)
            policy.trunk = parts.trunk
        else:  # merged weights, then fresh adapters (or full fine-tuning) on them
            model, tokenizer = load_model(cfg.path, cfg)
            ref = None
            if cfg.reference == "base":
                ref, _ = load_model(parts.trunk, cfg)
                ref = _ready(ref, tokenizer, device).eval().requires_grad_(False)
            policy = cls.from_model(model, tokenizer, cfg.lora, device, ref_model=ref)
            policy.trunk = str(Path(cfg.path).expanduser().resolve())
        policy.started_from = parts
        if not cfg.chunked_logprobs:
            policy._chunked = False
        _apply_chat_template(policy.tokenizer, cfg.chat_template)
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
        model = _ready(model, tokenizer, device)
        if lora.enabled:
            from peft import LoraConfig, get_peft_model

            peft_cfg = LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=_targets(model, lora.target_modules), task_type="CAUSAL_LM",
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
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False

    @property
    def eos_ids(self) -> list[int]:
        """Every token that ends a response: the tokenizer's EOS and each of the generation
        config's (Llama 3 ends a turn with <|eot_id|> or <|end_of_text|>, Qwen with <|im_end|>)."""
        return eos_ids(self.model, self.tokenizer)

    # ---------------------------------------------------------------- parameters

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
            return _Trunk(ref, None)(input_ids, attention_mask, query_len, False, self.keeps_logits,
                                     stats=(temperature, False))[0]

    @property
    def chunked(self) -> bool:
        """Whether log-probs come through the chunked vocabulary projection (see token_logprobs)."""
        if self._chunked is None:
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
            scaled = any(getattr(config, key, None) not in (None, 1, 1.0)
                         for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                                     "lm_head_multiplier"))
            self._chunked = not scaled and base.get_output_embeddings() is not None and bool(
                getattr(base, "base_model_prefix", "")) and hasattr(base, base.base_model_prefix)
        return self._chunked

    def _local_trunk(self) -> _Trunk:
        if self._local is None or self._local.value_head is not self.value_head:
            self._local = _Trunk(self.model, self.value_head)
        return self._local

    def enable_sharding(self, device: torch.device, param_dtype: torch.dtype | None = None) -> None:
        """Shard the weights, gradients and optimizer state over the ranks with FSDP2 (see
        rlhf.core.sharding): the trainable forward (and the frozen reference copy, without
        LoRA) block by block, each rank's shards moved to `device` (load the policy on the
        CPU: the whole model then never has to fit the device). Call after the value head is
        attached, before the optimizer is built (it must hold the sharded parameters)."""
        self.device = device
        # the value head is a unit of its own: it is float32 whatever the model's dtype, and FSDP2
        # wants one dtype in a unit
        heads = (self.value_head,) if self.value_head is not None else ()
        self._local = sharding.shard(_Trunk(self.model, self.value_head), self.model, device, param_dtype, heads)
        self._local.returns_copies = True
        self.sharded = True
        if self._ref_model is not None:
            self._ref_root = sharding.shard(_Trunk(self._ref_model, None), self._ref_model, device, param_dtype)
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
        for its length (see rlhf.core.sharding.gathered)."""
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

        trunk = _Trunk(self.model, self.value_head)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(trunk, device_ids=ids)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
        with self.reference() as ref:
            out = ref(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                      use_cache=False, **self._response_logits_only(input_ids, query_len))
        return _response_logits(out.logits, input_ids, query_len)

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

            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._keeps_logits

    @property
    def cache_argument(self) -> str:
        """The name the model's forward takes its KV cache by, and returns it under: `cache` from
        transformers 5.2x (which deprecates `past_key_values`, removed in 5.40), else `past_key_values`."""
        import inspect

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
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

    def save(self, directory: str, whole: dict[str, torch.Tensor] | None = None) -> None:
        """Adapters (or full weights) and value head as safetensors, plus the tokenizer. The
        adapters name what they sit on as a policy.path value ("embedded", a hub name, a run),
        not as this machine's cache path, so a run moves to another machine. Sharded: from
        `whole`, what full_state() gathered."""
        import json

        from safetensors.torch import save_file

        model_state = head_state = None
        if whole is not None:  # a tied weight once, under the name the model's own state_dict keeps
            names = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
            model_state = {k.removeprefix("model."): v for k, v in whole.items() if k.removeprefix("model.") in names}
            head_state = {k.removeprefix("value_head."): v for k, v in whole.items() if k.startswith("value_head.")}
        elif self.value_head is not None:
            head_state = self.value_head.state_dict()
        self.model.save_pretrained(directory, safe_serialization=True, state_dict=model_state)
        self.tokenizer.save_pretrained(directory)
        adapter_config = Path(directory) / "adapter_config.json"
        if self.lora and adapter_config.is_file() and self.trunk:
            record = json.loads(adapter_config.read_text())
            record["base_model_name_or_path"] = portable_name(self.trunk)
            adapter_config.write_text(json.dumps(record, indent=2) + "\n")
        elif not self.lora and self.trunk:  # full weights: the base they started from, for policy.reference=base
            (Path(directory) / BASE_RECORD).write_text(json.dumps({"base": portable_name(self.trunk)}) + "\n")
        if head_state:
            save_file({k: v.contiguous() for k, v in head_state.items()}, f"{directory}/value_head.safetensors")


def _targets(model: nn.Module, wanted: list[str] | None) -> list[str] | str | None:
    """peft's target_modules: "all-linear" as peft spells it, or the names, checked against the
    model so that a preset's names for another architecture fail saying what this one has."""
    if not wanted:
        return None
    if list(wanted) == ["all-linear"]:
        return "all-linear"
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
    missing = [w for w in wanted if not any(name == w or name.endswith("." + w) for name, _ in model.named_modules())]
    if missing:
        raise ValueError(f"policy.lora.target_modules: {missing} not in this model ({type(model).__name__}); its linear "
                         f"layers are {linear}: name some of them, or use [all-linear] (every linear layer but the "
                         "output one) or null (peft's default for the architecture)")
    return list(wanted)


def eos_ids(model: nn.Module, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return sorted(ids)


def _apply_chat_template(tokenizer, path: str | None) -> None:
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"policy.chat_template={path}: no such file (a Jinja chat template)")
        tokenizer.chat_template = file.read_text()


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not have this policy's names, shapes or dtypes."""


class _Trunk(nn.Module):
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
        logits = _response_logits(out.logits, input_ids, query_len)
        values = None
        if with_values and self.value_head is not None:
            hidden = out.hidden_states[-1][:, query_len - 1 : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values


    def _token_stats(self, input_ids, attention_mask, query_len: int, with_values: bool, temperature: float,
                     with_entropy: bool):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
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


def _response_logits(logits: torch.Tensor, input_ids: torch.Tensor, query_len: int) -> torch.Tensor:
    """(B, T, V): the logits predicting response tokens 0..T-1, from the full sequence's logits
    or from the last T + 1 positions' (logits_to_keep)."""
    T = input_ids.shape[1] - query_len
    return logits[:, -T - 1 : -1]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them: 0 at the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _ready(model: nn.Module, tokenizer, device: torch.device) -> nn.Module:
    """Padding set up, dropout off, on its device."""
    _prepare_tokenizer(tokenizer, model)
    _disable_dropout(model)
    return model.to(device)


def _prepare_tokenizer(tokenizer, model: nn.Module) -> None:
    """Left padding for generation; a pad token (EOS if the model has none: masked anyway)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _disable_dropout(model: nn.Module) -> None:
    """Dropout off in the base model: with it, log pi_old and log pi of PPO's first epoch differ."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
