"""`rlhf-train`: the Hydra entry point. Discovery first, so plugins are in the ConfigStore."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlhf import registry
from rlhf.config import store_schema


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _train(cfg: DictConfig) -> float:
    from rlhf.trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    s = train(cfg, run_dir)
    print(f"held-out reward   {s['reward_start']:.3f} -> {s['reward_end']:.3f}")
    print(f"KL to reference   {s['kl_start']:.3f} -> {s['kl_end']:.3f} nats")
    print(f"run directory     {run_dir}  ({s['wall_s']:.0f} s)")
    return s["reward_end"]


def main() -> None:
    registry.discover()
    store_schema()
    _train()


if __name__ == "__main__":
    main()
