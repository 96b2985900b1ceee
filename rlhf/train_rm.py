"""`rlhf-train-rm`: the reward-model Hydra app; it shares `conf/` with rlhf-train."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlhf import registry
from rlhf.reward_model import store_schema


@hydra.main(config_path="conf", config_name="train_rm", version_base="1.3")
def _train_rm(cfg: DictConfig) -> float:
    from rlhf.reward_model import train_reward_model

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    s = train_reward_model(cfg, run_dir)
    print(f"held-out pairwise accuracy   {s['pairwise_accuracy']:.3f}  ({s['held_out_pairs']} pairs)")
    print(f"reward model                 {s['reward_model']}")
    print(f"use it with                  rlhf-train reward=learned_rm reward.path={run_dir}")
    return s["pairwise_accuracy"]


def main() -> None:
    registry.discover()
    store_schema()
    _train_rm()


if __name__ == "__main__":
    main()
