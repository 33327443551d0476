"""The SLURM launcher of ``configs/hydra/launcher/submitit_slurm.yaml``: hydra-submitit-launcher's,
with the framework's submission (``deflect.engine.slurm.submit_sweep``). Hydra takes launchers
only from the ``hydra_plugins`` package, hence this module."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as _SubmititSlurmLauncher,
    )
except ImportError:  # the slurm extra is not installed: run.py says how to install it
    _SubmititSlurmLauncher = None

if _SubmititSlurmLauncher is not None:

    class SlurmLauncher(_SubmititSlurmLauncher):
        """submitit's SLURM launcher; the sweep is listed in ``slurm_jobs.json`` when it is
        submitted, and awaited through ``squeue`` (no accounting needed)."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            """Submit the jobs as one SLURM job array and wait for them."""
            from deflect.engine.slurm import submit_sweep

            return submit_sweep(self, job_overrides, initial_job_idx)
