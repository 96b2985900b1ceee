"""Installed as `hydra_plugins.rlhf_launcher`: Hydra takes launchers only from the
`hydra_plugins` namespace, and `hydra/launcher=joblib` of rlhf-train points here (and
`hydra/sweeper=grids`). The work is done in rlhf.apps.launcher and rlhf.apps.sweep."""

import logging

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

log = logging.getLogger(__name__)
_ABSENT = object()


class IsolatedJoblibLauncher(JoblibLauncher):
    """joblib's launcher, each job in a process of its own (rlhf.apps.launcher)."""

    def launch(self, job_overrides, initial_job_idx):
        from rlhf.apps import launcher

        return launcher.launch(self, job_overrides, initial_job_idx)


class GridsSweeper(Sweeper):
    """`hydra/sweeper=grids`: the union of several grids instead of one Cartesian product
    (rlhf.apps.sweep.grid_jobs): each method of an experiment sweeps its own knobs.
    `{sweep_dir}` in a value of `grids` or `params` is the sweep's directory. Hydra's basic
    sweeper does the rest; it is held, not inherited from, because Hydra's plugin scan loads
    its module again (a subclass made before the scan would no longer be one of it)."""

    def __init__(self, max_batch_size=None, params=None, grids=None):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        self.basic = BasicSweeper(max_batch_size, params)
        self.grids = {name: dict(grid or {}) for name, grid in (grids or {}).items()}
        self._configs: dict = {}  # each grid's first job's config, composed once (_has)

    def setup(self, *, hydra_context, task_function, config) -> None:
        from rlhf.apps.sweep import in_sweep

        self.basic.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.hydra_context, root = hydra_context, config.hydra.sweep.dir
        parse = OverridesParser.create(config_loader=hydra_context.config_loader).parse_overrides
        self.own = {name: parse([f"{k}={in_sweep(v, root)}" for k, v in grid.items()]) for name, grid in self.grids.items()}
        self.basic._parse_config = lambda: [f"{k}={in_sweep(v, root)}" for k, v in self.basic.params.items()]
        self.basic.split_arguments = self.split_arguments

    def sweep(self, arguments):
        return self.basic.sweep(arguments)

    def split_arguments(self, overrides, max_batch_size):
        from rlhf.apps.sweep import grid_jobs

        basic = type(self.basic)
        if not self.grids:
            return basic.split_arguments(overrides, max_batch_size)
        def product(o):
            return basic.split_arguments(o, None)[0]
        self._common = list(overrides)
        jobs, left_out = grid_jobs(self.own, overrides, product, self._has)
        for name, keys in left_out.items():
            log.info(f"grid {name}: {', '.join(keys)} left out (its config has no such field)")
        return list(basic.split_overrides_to_chunks(jobs, max_batch_size))

    def _has(self, grid: str, key: str) -> bool:
        """Whether the config of the grid's first job has the field `key`: composed from the grid's
        own overrides and the common ones that choose configs (`+experiment=...`, `optimizer=...`),
        once per grid. A grid that does not compose so is given every key (its jobs then say why)."""
        from omegaconf import OmegaConf

        from rlhf.apps.sweep import bare_key

        if grid not in self._configs:
            own = self.own[grid]
            keys = {bare_key(o) for o in own}
            choosing = [o for o in self._common if "." not in bare_key(o) and bare_key(o) not in keys]
            first = type(self.basic).split_arguments(own + choosing, None)[0][0]
            try:
                self._configs[grid] = self.hydra_context.config_loader.load_sweep_config(self.basic.config, first)
            except Exception:
                self._configs[grid] = None
        cfg = self._configs[grid]
        return cfg is None or OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT
