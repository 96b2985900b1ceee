"""Every `_target_` of the config Hydra composes is checked before Hydra builds anything.

Hydra instantiates `hydra.callbacks`, the launcher and the sweeper, and Python's logging
builds the handlers of `hydra.job_logging`, from whatever the composed config names, before
a command's own code runs; a YAML passed with --config-dir could name any function there.
`install` wraps Hydra's composition (for this process) with `registry.check_targets`, so a
config is refused, naming the offending keys, before anything in it is called.
"""

from __future__ import annotations

from rlhf.contracts import registry

# the commands' own classes that their configs name
ALLOWED = ("rlhf.apps.sweep.SweepCallback", "hydra_plugins.rlhf_launcher.")


def install() -> None:
    from hydra._internal.hydra import Hydra

    compose = Hydra.compose_config
    if getattr(compose, "checks_targets", False):
        return

    def compose_config(self, *args, **kwargs):
        cfg = compose(self, *args, **kwargs)
        registry.check_targets(cfg, ALLOWED)
        return cfg

    compose_config.checks_targets = True
    Hydra.compose_config = compose_config
