"""Installed as `hydra_plugins.rlhf_launcher`: Hydra takes launchers only from the
`hydra_plugins` namespace, and `hydra/launcher=joblib` of rlhf-train points here. The work is
done in rlhf.apps.launcher."""

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class IsolatedJoblibLauncher(JoblibLauncher):
    """joblib's launcher, each job in a process of its own (rlhf.apps.launcher)."""

    def launch(self, job_overrides, initial_job_idx):
        from rlhf.apps import launcher

        return launcher.launch(self, job_overrides, initial_job_idx)
