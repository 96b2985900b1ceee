"""The library: the services the one training loop composes (policy, rollouts, batch
sources, data, numerics, evaluation, checkpoints, the run directory, data parallelism).
It knows the contracts (`rlhf.contracts`), never a concrete plugin and never a command."""
