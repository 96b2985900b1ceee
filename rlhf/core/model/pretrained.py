"""Where a policy's weights come from: a model named by policy.path ("embedded", "toy...",
a hub name, a directory) or a trained run (its adapters or full weights, on the base it
started from), and the names that let a run move to another machine."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from rlhf.contracts.schema import PolicyConfig
from rlhf.core.model import hub
from rlhf.core.run import rundir


def resolve_path(path: str) -> str:
    if path == "embedded":
        from rlhf.embedded.build import policy_path

        return policy_path()
    if path == "arithmetic":
        from rlhf.embedded import arithmetic

        return arithmetic.policy_path()
    if path == "calculator":
        from rlhf.embedded import calculator

        return calculator.policy_path()
    from rlhf.embedded import toy

    if toy.is_toy(path):
        return toy.resolve(path)
    return path


BASE_RECORD = rundir.BASE_RECORD


@dataclasses.dataclass
class TrainedParts:
    """Where a trained run's policy is: its adapters (peft) or full weights (full fine-tuning),
    the policy.path value they sit on or started from, and its value head if it had one."""

    adapters: Path | None
    weights: Path | None
    trunk: str
    value_head: Path | None


def trained_parts(path: str) -> TrainedParts | None:
    """A run directory of rlhf-train, its final/, or a directory of peft adapters; None for a
    model (hub name, model directory, "embedded", "toy...")."""
    import json

    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    final, recorded = p, None
    if rundir.is_run(p):
        final = p / rundir.FINAL
        if not final.is_dir():
            raise FileNotFoundError(f"policy.path={path}: a run directory without final/ (it has not finished, or ran "
                                    "with train.save_final=false); resume it first, or point at another run")
        from omegaconf import OmegaConf

        recorded = str(OmegaConf.load(p / rundir.CONFIG).policy.path)
    elif rundir.is_run(p.parent) and p.name == rundir.FINAL:
        from omegaconf import OmegaConf

        recorded = str(OmegaConf.load(p.parent / rundir.CONFIG).policy.path)
    head = final / rundir.VALUE_HEAD
    head = head if head.is_file() else None
    if (final / rundir.ADAPTER_CONFIG).is_file():
        trunk = json.loads((final / rundir.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path") or ""
        if recorded is not None and Path(trunk).is_absolute() and not Path(trunk).exists():
            trunk = recorded  # an older run recorded this machine's cache path; a hub name stays as it is
        if not trunk:
            raise ValueError(f"policy.path={path}: adapter_config.json names no base model (base_model_name_or_path); "
                             "set it to the model the adapters were trained on")
        return TrainedParts(final, None, trunk, head)
    if recorded is not None and (final / rundir.MODEL_CONFIG).is_file():
        record = final / BASE_RECORD
        base = json.loads(record.read_text())["base"] if record.is_file() else recorded
        return TrainedParts(None, final, base, head)
    if recorded is not None:
        raise FileNotFoundError(f"policy.path={path}: {final} holds neither adapters (adapter_config.json) nor a "
                                "model (config.json)")
    return None


def recorded_config(path: str) -> PolicyConfig:
    """A PolicyConfig for `path` with the loading settings (revision, trust_remote_code, dtype)
    of the run it is (or whose final/ it is); the defaults for anything else."""
    p = Path(path).expanduser()
    run = p if rundir.is_run(p) else p.parent if rundir.is_run(p.parent) else None
    if run is None:
        return PolicyConfig(path=path)
    from omegaconf import OmegaConf

    recorded = OmegaConf.load(run / rundir.CONFIG).get("policy") or {}
    return PolicyConfig(path=path, revision=recorded.get("revision"), dtype=recorded.get("dtype", "float32"),
                        trust_remote_code=bool(recorded.get("trust_remote_code", False)))


def is_built_here(name: str) -> bool:
    """A policy.path the project builds itself: "embedded", "arithmetic", "calculator", "toy...". """
    from rlhf.embedded import toy

    return name in ("embedded", "arithmetic", "calculator") or toy.is_toy(name)


def portable_name(trunk: str) -> str:
    """A policy.path value that means the same on another machine: names as they are, local
    directories absolute."""
    if is_built_here(trunk) or not Path(trunk).expanduser().exists():
        return trunk
    return str(Path(trunk).expanduser().resolve())


def load_model(path: str, cfg: PolicyConfig, tokenizer_from: Path | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) that `path` names: a model as it is, or a trained run's policy with
    its adapters merged in (recursively: a run may have started from another run)."""
    from dataclasses import replace

    parts = trained_parts(path)
    if parts is None:
        model, tokenizer = from_pretrained(replace(cfg, path=path))
    elif parts.weights is not None:
        model, tokenizer = from_pretrained(replace(cfg, path=str(parts.weights)))
    else:
        from peft import PeftModel

        trunk, tokenizer = load_model(parts.trunk, cfg, tokenizer_from=parts.adapters)
        with quiet_peft():
            model = merge(PeftModel.from_pretrained(trunk, str(parts.adapters)))
    if tokenizer_from is not None and (tokenizer_from / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    return model, tokenizer


def context_length(cfg: PolicyConfig) -> int | None:
    """Positions the model `cfg.path` names can attend over, from its config alone (no weights
    loaded; a trained run's base, or its own full weights); None where its config does not say
    or cannot be read here (the load that follows says why)."""
    from transformers import AutoConfig

    parts = trained_parts(cfg.path)
    path = resolve_path(cfg.path if parts is None else str(parts.weights) if parts.weights is not None else parts.trunk)
    try:
        hub.check_model(path, "policy.path", cfg.revision)
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception:
        return None
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merge(model: nn.Module) -> nn.Module:
    """The adapters merged into the weights. An adapter on a tied output layer (the toy
    presets') adapts the output side only, so that layer is untied first: merged into the
    shared matrix it would change the input embeddings too."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    out = base.get_output_embeddings()
    text_config = base.config.get_text_config()
    tied = getattr(base.config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False)
    if tied and isinstance(out, BaseTunerLayer):
        layer = out.get_base_layer()
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
        base.config.tie_word_embeddings = text_config.tie_word_embeddings = False
    return model.merge_and_unload()


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():  # library chatter, not the user's concern:
        # GPT-2: Conv1D and a Linear lm_head, set per layer
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        # an adapter on a tied lm_head (the toy preset) adapts the output side only
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer")
        yield


def from_pretrained(cfg: PolicyConfig) -> tuple[nn.Module, object]:
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


# ---------------------------------------------------------------- a model made ready to train


def ready(model: nn.Module, tokenizer, device: torch.device) -> nn.Module:
    """Padding set up, dropout off, on its device."""
    prepare_tokenizer(tokenizer, model)
    disable_dropout(model)
    return model.to(device)


def prepare_tokenizer(tokenizer, model: nn.Module) -> None:
    """Left padding for generation; a pad token (EOS if the model has none: masked anyway)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in the base model: with it, log pi_old and log pi of PPO's first epoch differ."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def lora_targets(model: nn.Module, wanted: list[str] | None) -> list[str] | str | None:
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


def apply_chat_template(tokenizer, path: str | None) -> None:
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"policy.chat_template={path}: no such file (a Jinja chat template)")
        tokenizer.chat_template = file.read_text()


def save_policy(policy, directory: str, whole: dict[str, torch.Tensor] | None = None) -> None:
    """A policy's adapters (or full weights) and value head as safetensors, plus the tokenizer
    (`final/`). The adapters name what they sit on as a policy.path value ("embedded", a hub
    name, a run), not as this machine's cache path, so a run moves to another machine.
    Sharded: from `whole`, what policy.full_state() gathered."""
    import json

    from safetensors.torch import save_file

    model_state = head_state = None
    if whole is not None:  # a tied weight once, under the name the model's own state_dict keeps
        names = {n for n, _ in policy.model.named_parameters()} | {n for n, _ in policy.model.named_buffers()}
        model_state = {k.removeprefix("model."): v for k, v in whole.items() if k.removeprefix("model.") in names}
        head_state = {k.removeprefix("value_head."): v for k, v in whole.items() if k.startswith("value_head.")}
    elif policy.value_head is not None:
        head_state = policy.value_head.state_dict()
    policy.model.save_pretrained(directory, safe_serialization=True, state_dict=model_state)
    policy.tokenizer.save_pretrained(directory)
    adapter_config = Path(directory) / rundir.ADAPTER_CONFIG
    if policy.lora and adapter_config.is_file() and policy.trunk:
        record = json.loads(adapter_config.read_text())
        record["base_model_name_or_path"] = portable_name(policy.trunk)
        adapter_config.write_text(json.dumps(record, indent=2) + "\n")
    elif not policy.lora and policy.trunk:  # full weights: the base they started from, for policy.reference=base
        (Path(directory) / rundir.BASE_RECORD).write_text(json.dumps({"base": portable_name(policy.trunk)}) + "\n")
    if head_state:
        save_file({k: v.contiguous() for k, v in head_state.items()}, str(Path(directory) / rundir.VALUE_HEAD))
