"""Every setting a run accepts is in force, or the run refuses it in one line.

Each field of each optimizer plugin is set, alone, away from its default on a three-step run of
the sequence toy (the pair optimizers on its preference pairs; `OTHER` gives a value with what it
needs, where the field's range asks for another setting too): the run either refuses it naming
the field ("not in force": it acts only with another setting, `Config.inert`) or ends with other
metrics or other weights than the default run. A field that a run took and ignored fails here."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.contracts import registry, schema
from rlhf.core.loop.trainer import Trainer
from rlhf.core.run import rundir

RUN = ["train.steps=3", "train.batch_size=8", "data.n_train=8", "data.n_eval=4", "eval.every=2", "checkpoint.every=0",
       "eval.kl_to_optimum=false", "threads=1", "train.lr_schedule=constant"]
PAIRS = ["+experiment=toy_sequences_dpo", "data.n_train=16"]
ONLINE = ["+experiment=toy_sequences", "optimizer=dpo", "optimizer.online=true"]
# another valid value for the fields that are not plain numbers or booleans
OTHER = {"kl_estimator": "k3", "advantage": "nstep", "baseline": "batch", "loss_aggregation": "sum",
         "loss_type": "ipo", "correction": "sequence", "kl_penalty": ["loss", "optimizer.kl_estimator=k3"]}
# values whose effect two small steps show (a clip that bites, a guard that trips, a rate that moves)
VISIBLE = {"max_grad_norm": 1e-3, "ratio_threshold": 1.0001, "clip_coef": 1e-3, "clip_coef_value": 1e-4,
           "kl_horizon": 10, "kl_target": 1e-3, "adam_eps": 1e-2, "is_cap": 1.01, "baseline_decay": 0.1,
           "gamma": 0.5, "gae_lambda": 0.5}


def _other(field: str, value):
    if field in VISIBLE:
        return VISIBLE[field]
    if field in OTHER:
        return OTHER[field]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value != 1 else 2
    if isinstance(value, float):
        return value * 3 if value else 0.25
    if value is None:  # dpo's lr: null picks its default
        return 3e-3
    raise AssertionError(f"no other value known for {field}={value!r}: add it to OTHER")




@pytest.mark.parametrize("optimizer", ["ppo", "a2c", "reinforce", "rloo", "grpo", "dm", "dpo", "dpo-online", "sft"])
def test_every_optimizer_field_is_in_force_or_refused(tmp_path, optimizer):
    base = (PAIRS + (["optimizer=sft"] if optimizer == "sft" else []) if optimizer in ("dpo", "sft")
            else ONLINE if optimizer == "dpo-online" else ["+experiment=toy_sequences", f"optimizer={optimizer}"])
    cfg = schema.compose([*base, *RUN])
    fields = {k: v for k, v in OmegaConf.to_container(cfg.optimizer).items() if k != "_target_"}

    def run(*extra: str):
        try:
            c = schema.compose([*base, *extra, *RUN])
            t = Trainer(c, tmp_path / f"run{len(list(tmp_path.iterdir()))}")
            t.fit()
        except (ValueError, registry.PluginError) as e:
            return str(e)
        metrics = [{k: v for k, v in json.loads(line).items() if not k.startswith("time/") and k != "wall_s"}
                   for line in (t.run_dir / rundir.METRICS).read_text().splitlines()]
        return metrics, {k: v.detach().clone() for k, v in t.policy.trainable_state().items()}

    default = run()
    assert not isinstance(default, str), default
    silent, refused = [], []
    for field, value in fields.items():
        if optimizer == "dpo-online" and field == "online":
            continue  # (the other value is the offline run, on other data)
        other, *companions = _other(field, value) if isinstance(_other(field, value), list) else [_other(field, value)]
        out = run(f"optimizer.{field}={json.dumps(other) if isinstance(other, str) else other}", *companions)
        if isinstance(out, str):
            assert f"optimizer.{field}=" in out and "not in force" in out, (field, out)
            refused.append(field)
            continue
        same_metrics = out[0] == default[0]
        same_weights = all(torch.equal(out[1][k], default[1][k]) for k in default[1])
        if same_metrics and same_weights:
            silent.append(f"{field}={other!r}")
    assert not silent, f"{optimizer}: accepted and without effect: {silent}"
