"""What every Hydra command of the project does before Hydra starts.

- Plugins discovered and every schema stored, so `optimizer=ppo` and typed overrides work.
- Every `_target_` of the config Hydra composes is checked before Hydra builds anything:
  Hydra instantiates `hydra.callbacks`, the launcher and the sweeper, and Python's logging
  builds the handlers of `hydra.job_logging`, from whatever the composed config names,
  before a command's own code runs; a YAML passed with --config-dir could name any function
  there. Hydra's composition is wrapped (for this process) with `registry.check_targets`.
- The launcher of `hydra/launcher=joblib` (hydra_plugins.rlhf_launcher) made known to
  Hydra, whose scan of the `hydra_plugins` namespace misses it in an editable install.
- Warnings printed as one line each, without the source line that raised them.
"""

from __future__ import annotations

import warnings

from rlhf.contracts import registry, schema

# the commands' own classes that their configs name
ALLOWED = ("rlhf.apps.sweep.SweepCallback", "rlhf.apps.sweep.Prepare", "hydra_plugins.rlhf_launcher.")


def prepare() -> None:
    warnings.formatwarning = _one_line
    # our joblib.yaml takes the place of the joblib plugin's config of the same name, on purpose
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema")
    registry.discover()
    schema.store()
    _check_targets()
    _register_launcher()


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}\n"


def _check_targets() -> None:
    """Check every config the moment Hydra's loader has composed it, before Hydra uses any
    of it (it configures its own logging inside composition): the run's and each job's."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    for name in ("load_configuration", "load_sweep_config"):
        load = getattr(ConfigLoaderImpl, name)
        if getattr(load, "checks_targets", False):
            continue

        def checked(self, *args, _load=load, **kwargs):
            cfg = _load(self, *args, **kwargs)
            registry.check_targets(cfg, ALLOWED)
            return cfg

        checked.checks_targets = True
        setattr(ConfigLoaderImpl, name, checked)


def _register_launcher() -> None:
    from hydra.core.plugins import Plugins
    from hydra_plugins.rlhf_launcher import GridsSweeper, IsolatedJoblibLauncher

    for plugin in (IsolatedJoblibLauncher, GridsSweeper):
        Plugins.instance().class_name_to_class.setdefault(f"{plugin.__module__}.{plugin.__name__}", plugin)
