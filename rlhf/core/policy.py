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
from rlhf.core import hub, rundir


def resolve_path(path: str) -> str:
    if path == "embedded":
        from rlhf.embedded.build import policy_path

        return policy_path()
    from rlhf.embedded import toy

    if toy.is_toy(path):
        return toy.resolve(path)
    return path


class Policy:
    """Causal LM (+ adapters) with an optional value head; computes log-probs for the core."""

    def __init__(self, model: nn.Module, tokenizer, lora: bool, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.lora = lora
        self.device = device
        self.value_head: nn.Linear | None = None
        self._ref_model: nn.Module | None = None
        self._keeps_logits: bool | None = None  # does the model's forward take logits_to_keep
        self._ddp: nn.Module | None = None  # DistributedDataParallel over model + value head, when data-parallel
        self._local: _Trunk | None = None
        if not lora:  # a full copy, frozen: the price LoRA avoids
            self._ref_model = copy.deepcopy(model).eval().requires_grad_(False)

    # ---------------------------------------------------------------- construction

    @classmethod
    def load(cls, cfg: PolicyConfig, device: torch.device) -> Policy:
        return cls.from_model(*_from_pretrained(cfg), cfg.lora, device)

    @classmethod
    def load_trained(cls, cfg: PolicyConfig, device: torch.device) -> Policy:
        """A policy to sample from: `cfg.path` may also be a run directory of rlhf-train (its
        base model, as recorded in `.hydra/config.yaml`, with the adapters of `final/`) or a
        directory of saved adapters (peft's adapter_config.json names the base)."""
        import json

        from omegaconf import OmegaConf

        path = Path(cfg.path).expanduser()
        adapters = path / rundir.FINAL if rundir.is_run(path) else path
        if not (adapters / "adapter_config.json").is_file():
            if rundir.is_run(path):
                raise FileNotFoundError(f"policy.path={path}: a run directory without final/adapter_config.json "
                                        "(did the run finish with train.save_final=true, and with LoRA?)")
            return cls.load(cfg, device)
        from peft import PeftModel

        if adapters is path:
            base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
            base_cfg = PolicyConfig(path=base, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
        else:
            recorded = OmegaConf.load(path / rundir.CONFIG).policy
            base_cfg = PolicyConfig(path=recorded.path, revision=recorded.get("revision"), dtype=cfg.dtype,
                                    trust_remote_code=recorded.get("trust_remote_code", False))
        model, tokenizer = _from_pretrained(base_cfg)
        model = PeftModel.from_pretrained(model, str(adapters), is_trainable=False)
        return cls(_ready(model, tokenizer, device), tokenizer, True, device)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, lora: LoraSettings, device: torch.device) -> Policy:
        model = _ready(model, tokenizer, device)
        if lora.enabled:
            from peft import LoraConfig, get_peft_model

            peft_cfg = LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules) if lora.target_modules else None,
                task_type="CAUSAL_LM",
            )
            with warnings.catch_warnings():  # library chatter, not the user's concern:
                # GPT-2: Conv1D and a Linear lm_head, set per layer
                warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
                # an adapter on a tied lm_head (the toy preset) adapts the output side only; we never merge
                warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer")
                model = get_peft_model(model, peft_cfg)
        return cls(model, tokenizer, lora.enabled, device)

    def attach_value_head(self) -> None:
        """A linear value head on the last hidden state of the (adapted) trunk."""
        self.value_head = nn.Linear(self.model.config.hidden_size, 1).to(self.device)
        nn.init.zeros_(self.value_head.weight)  # V = 0 until the critic has learned something
        nn.init.zeros_(self.value_head.bias)

    # ---------------------------------------------------------------- parameters

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from (p for p in self.model.parameters() if p.requires_grad)
        if self.value_head is not None:
            yield from self.value_head.parameters()

    def train(self) -> None:
        self.model.train()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor by name (adapters, or all weights, and the value head),
        sharing storage with the parameters."""
        out = {f"model.{n}": p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        if self.value_head is not None:
            out.update({f"value_head.{n}": p.detach() for n, p in self.value_head.named_parameters()})
        return out

    @torch.no_grad()
    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a checkpoint's tensors in, after checking that every one has this policy's
        name, shape and dtype (CheckpointMismatch names the first that do not)."""
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
        if self._ddp is not None and torch.is_grad_enabled():
            trunk = self._ddp
        else:
            if self._local is None or self._local.value_head is not self.value_head:
                self._local = _Trunk(self.model, self.value_head)
            trunk = self._local
        logits, values = trunk(input_ids, attention_mask, query_len, with_values, self.keeps_logits)
        return logits, values

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

    def _response_logits_only(self, input_ids: torch.Tensor, query_len: int) -> dict:
        """Ask for the logits of the last T + 1 positions only: the query's rows of the
        vocabulary projection are never computed."""
        return {"logits_to_keep": input_ids.shape[1] - query_len + 1} if self.keeps_logits else {}

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The reference model: adapters disabled on the same weights, or the frozen copy."""
        if self._ref_model is not None:
            yield self._ref_model
        else:
            with self.model.disable_adapter():
                yield self.model

    # ---------------------------------------------------------------- saving

    def save(self, directory: str) -> None:
        """Adapters (or full weights) and value head as safetensors, plus the tokenizer."""
        from safetensors.torch import save_file

        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        if self.value_head is not None:
            save_file({k: v.contiguous() for k, v in self.value_head.state_dict().items()},
                      f"{directory}/value_head.safetensors")


class CheckpointMismatch(ValueError):
    """A checkpoint's tensors do not have this policy's names, shapes or dtypes."""


class _Trunk(nn.Module):
    """The policy's trainable forward as one module (the LM and its value head), so that
    DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, value_head: nn.Module | None):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(self, input_ids, attention_mask, query_len: int, with_values: bool, keeps_logits: bool):
        keep = {"logits_to_keep": input_ids.shape[1] - query_len + 1} if keeps_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                         output_hidden_states=with_values, use_cache=False, **keep)
        logits = _response_logits(out.logits, input_ids, query_len)
        values = None
        if with_values and self.value_head is not None:
            hidden = out.hidden_states[-1][:, query_len - 1 : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        return logits, values


def _response_logits(logits: torch.Tensor, input_ids: torch.Tensor, query_len: int) -> torch.Tensor:
    """(B, T, V): the logits predicting response tokens 0..T-1, from the full sequence's logits
    or from the last T + 1 positions' (logits_to_keep)."""
    T = input_ids.shape[1] - query_len
    return logits[:, -T - 1 : -1]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` uses them: 0 at the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _from_pretrained(cfg: PolicyConfig) -> tuple[nn.Module, object]:
    """(model, tokenizer) of `cfg.path` (hub name, local directory, "embedded" or "toy")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_path(cfg.path)
    hub.check_model(path, "policy.path", cfg.revision)  # offline: at once, not after a minute of retries
    common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.dtype), **common)
        return model, AutoTokenizer.from_pretrained(path, **common)
    except Exception as e:  # a damaged weights file names no file of its own
        raise OSError(f"policy.path={cfg.path}: the model in {path} could not be loaded ({type(e).__name__}: {e}); "
                      "if a file there is damaged or cut short, save or download the model again") from e


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
