"""Hydra finds launchers only in the `hydra_plugins` namespace: this is where
`hydra/launcher=joblib` of rlhf-train points. The work is done in rlhf.apps.launcher."""

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class IsolatedJoblibLauncher(JoblibLauncher):
    """joblib's launcher, each job in a process of its own (rlhf.apps.launcher)."""

    def launch(self, job_overrides, initial_job_idx):
        from rlhf.apps import launcher

        return launcher.launch(self, job_overrides, initial_job_idx)
