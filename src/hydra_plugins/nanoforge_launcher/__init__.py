"""nanoforge's SLURM launcher, where Hydra looks for launchers (the ``hydra_plugins``
namespace); ``configs/hydra/launcher/slurm.yaml`` names it. The helpers are in
``nanoforge.slurm``."""

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
    SlurmLauncher as _SubmititSlurmLauncher,
)

from nanoforge.slurm import refusal_message, use_squeue_without_accounting


class SlurmLauncher(_SubmititSlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher: an sbatch refusal ends in one line with its
    fix, and job states come from squeue where the cluster keeps no accounting."""

    def launch(self, job_overrides, initial_job_idx):
        from submitit.core.utils import FailedJobError

        from nanoforge.errors import fail

        use_squeue_without_accounting()
        try:
            return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as e:
            if "sbatch" not in str(e) and "submission" not in str(e).lower():
                raise
            fail(refusal_message(str(e)))
