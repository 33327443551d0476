"""Launching sweeps: SLURM through Hydra's submitit launcher
(``python run.py -m hydra/launcher=submitit_slurm``).

What the framework adds to hydra-submitit-launcher's ``SlurmLauncher`` (:func:`submit.wire_launcher`
makes its ``launch`` call :func:`submit.submit_sweep`):

* the sweep's jobs are listed in ``<sweep>/slurm_jobs.json`` (number, overrides, SLURM job id,
  log files) as soon as ``sbatch`` accepts the array, so ``scripts/sweep_status.py`` can say where
  each stands before any has started;
* the submitting command waits for the jobs through ``squeue`` and the jobs' result files, not
  ``sacct``, so it also ends on clusters without accounting, and a job that died before Python
  started is reported as failed with its SLURM log named;
* submission errors (a partition that does not exist, an array over ``MaxArraySize``) say the
  fix next to SLURM's own message;
* a job records its SLURM job id(s) and every start in ``<run>/slurm.json``; a requeued job
  (time-limit warning, preemption, ``scontrol requeue``) finds its own id there and resumes from
  ``checkpoints/last.pt`` as ``resume=true`` would;
* each SLURM task of a job with ``tasks_per_node`` > 1 (or several nodes) becomes one DDP rank.

:mod:`deflect.launch.job` is the side inside a job, :mod:`deflect.launch.submit` the submitting
side.
"""
