"""proposal=auto: the rollout engine the step table says wins the step for this policy.

Chosen once the policy is loaded (`choose`), from its size and what this machine has: vLLM
where it is installed and can run the model, for a policy of at least `min_params` parameters
(below that the engine's fixed costs outweigh its faster sampling: the step table, docs "vLLM
as the rollout engine"); its dtype bfloat16 when the trainer computes in bf16 (`precision=auto`
picks that from 50M parameters on a GPU with bf16 or a CPU with bf16 units: avx512_bf16 or
AMX), else float32 with `bypass` (its log q stands for the trainer's pass, which a bfloat16
engine's cannot); the policy's own loop otherwise, and for an optimizer with a value head (PPO,
A2C) trained in float32, whose values need the trainer's pass anyway (the engine made that
step 5-9% slower at 87M). The choice and why
is said in one line at the start and recorded in summary.json (`proposal`).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

from rlhf.contracts.interfaces import Sampling
from rlhf.contracts.registry import register
from rlhf.core.toolkit.models import bf16_units


@register("proposal", "auto")
class Auto:
    """Picks vLLM (bfloat16 where the device has bf16 units) or the policy's own loop."""

    @dataclass
    class Config:
        min_params: int = 50_000_000  # the smallest policy the engine is chosen for (the step table's crossover)
        kv_cache_mb: int = 256  # the engine's KV cache, when it is chosen

    is_policy = True  # until `choose` replaces this proposal by the one chosen
    chooses = True

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def choose(self, policy, sampling: Sampling, needs_values: bool = False, bf16_training: bool = False):
        """The proposal for this policy, and a line that says which and why. `needs_values`: the
        optimizer trains a value head (PPO, A2C), whose values only the trainer's own pass gives;
        `bf16_training`: the trainer computes in bf16 (precision)."""
        from rlhf_plugins.proposals.policy import CurrentPolicy

        n = policy.parameter_count()
        # bf16 training: a bfloat16 engine (the trainer's passes are bf16 anyway); float32 training: a float32
        # engine whose log q stands for log pi (bypass), as a bfloat16 one needs the trainer's pass (the step table)
        dtype = "bfloat16" if bf16_training and bf16_units(policy.device) else "float32"
        why = ""
        if n < self.cfg.min_params:
            why = f"{n / 1e6:.1f}M parameters, under proposal.min_params={self.cfg.min_params / 1e6:g}M"
        elif importlib.util.find_spec("vllm") is None:
            why = "vLLM is not installed"
        elif needs_values and not bf16_training:  # the step table: 1.05x-1.09x slower at 87M
            why = ("the optimizer's values need the trainer's own pass over every batch, which in float32 costs more "
                   "than the engine's faster sampling saves")
        if not why:
            from rlhf_plugins.proposals.vllm import VLLM

            # float32: its log q is the policy's, measured: bypass takes it for log pi (GRPO, RLOO, REINFORCE, dm)
            engine = VLLM(VLLM.Config(dtype=dtype, kv_cache_mb=self.cfg.kv_cache_mb, bypass=dtype == "float32"))
            try:
                engine.start(policy, sampling)
            except Exception as e:  # noqa: BLE001  (what the engine cannot run here, or a broken install: the loop)
                why = (str(e).splitlines() or [type(e).__name__])[0]
            else:
                print(f"proposal=auto: vLLM in {dtype} ({n / 1e6:.0f}M parameters)", file=sys.stderr)
                return engine, f"vllm-{dtype}"
        print(f"proposal=auto: the policy's own sampling loop ({why})", file=sys.stderr)
        return CurrentPolicy(CurrentPolicy.Config()), "policy"

    def sample(self, policy, queries, s: Sampling, with_values, rows):  # (never: replaced by the one chosen)
        raise RuntimeError("proposal=auto samples through the proposal it chose (Trainer calls choose first)")

    def after_update(self, policy) -> None:
        pass
