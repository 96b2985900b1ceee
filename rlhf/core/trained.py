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
from rlhf.core import hub, rundir


def resolve_path(path: str) -> str:
    if path == "embedded":
        from rlhf.embedded.build import policy_path

        return policy_path()
    if path == "arithmetic":
        from rlhf.embedded import arithmetic

        return arithmetic.policy_path()
    from rlhf.embedded import toy

    if toy.is_toy(path):
        return toy.resolve(path)
    return path


BASE_RECORD = "rlhf_base.json"  # final/ of a full fine-tuning run: the policy.path it started from


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
    head = final / "value_head.safetensors"
    head = head if head.is_file() else None
    if (final / "adapter_config.json").is_file():
        trunk = json.loads((final / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
        if recorded is not None and Path(trunk).is_absolute() and not Path(trunk).exists():
            trunk = recorded  # an older run recorded this machine's cache path; a hub name stays as it is
        if not trunk:
            raise ValueError(f"policy.path={path}: adapter_config.json names no base model (base_model_name_or_path); "
                             "set it to the model the adapters were trained on")
        return TrainedParts(final, None, trunk, head)
    if recorded is not None and (final / "config.json").is_file():
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
    """A policy.path the project builds itself: "embedded", "arithmetic", "toy...". """
    from rlhf.embedded import toy

    return name in ("embedded", "arithmetic") or toy.is_toy(name)


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
