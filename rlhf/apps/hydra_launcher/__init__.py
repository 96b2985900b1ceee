"""Installed as `hydra_plugins.rlhf_launcher`: Hydra takes launchers only from the
`hydra_plugins` namespace, and `hydra/launcher=joblib` of rlhf-train points here (and
`hydra/sweeper=grids`). The work is done in rlhf.apps.launcher and rlhf.apps.sweep."""

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.plugins.sweeper import Sweeper
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


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
        self.params = dict(params or {})
        self.grids = {name: dict(grid or {}) for name, grid in (grids or {}).items()}

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.basic.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.config, self.hydra_context = config, hydra_context
        self.basic._parse_config = lambda: [f"{k}={self._here(v)}" for k, v in self.params.items()]
        self.basic.split_arguments = self.split_arguments

    def sweep(self, arguments):
        return self.basic.sweep(arguments)

    def _here(self, value) -> str:
        return str(value).replace("{sweep_dir}", str(self.config.hydra.sweep.dir))

    def split_arguments(self, overrides, max_batch_size):
        from rlhf.apps.sweep import grid_jobs

        basic = type(self.basic)
        if not self.grids:
            return basic.split_arguments(overrides, max_batch_size)
        parse = OverridesParser.create(config_loader=self.hydra_context.config_loader).parse_overrides
        grids = {name: {k: self._here(v) for k, v in grid.items()} for name, grid in self.grids.items()}
        jobs = grid_jobs(grids, overrides, parse, lambda o: basic.split_arguments(o, None)[0])
        return list(basic.split_overrides_to_chunks(jobs, max_batch_size))
