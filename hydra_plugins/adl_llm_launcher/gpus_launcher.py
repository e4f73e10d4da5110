"""The launcher of `hydra/launcher=gpus` (conf/hydra/launcher/gpus.yaml). Hydra loads launchers only from the
hydra_plugins namespace, so it is declared here; what it does is in adl_llm/sweep_jobs.py."""

try:
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
except ImportError:  # no cluster extra: nothing to build on, and Hydra would warn at every start of a failed plugin
    JoblibLauncher = None

if JoblibLauncher is not None:

    class GpusLauncher(JoblibLauncher):
        """Hydra's joblib launcher, one worker per GPU, each choosing its next job (adl_llm.sweep_jobs)."""

        def launch(self, job_overrides, initial_job_idx):
            from adl_llm.sweep_jobs import launch

            return launch(self, job_overrides, initial_job_idx)
