"""Fine-tune a geospatial foundation model for a task, or evaluate a finished run.

    python run.py                                        # the demo
    torchrun --nproc_per_node=2 run.py encoder=vit_b16 dataset=demo finetune=deflect
    python run.py eval_dir=work_dirs/<run>                # re-evaluate a run on its test split
    python run.py -m finetune=frozen,lora,deflect seed=0,1   # an ablation: one folder per job
    python run.py -m hydra/launcher=submitit_slurm finetune=frozen,deflect   # ... on SLURM

Method: DEFLECT (Thoreau, Marsocci & Derksen, ICCV 2025, arXiv:2503.09493).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# Only Hydra and the folder helpers here: torch, timm and torchvision (about ten seconds on a
# small CPU) are imported once the config has composed, so a bad key or --help answers at once.
from deflect.engine.workdir import (
    FINISHED_MARKER,
    SweepJob,
    best_checkpoint,
    check_run_config,
    eval_config,
    is_finished,
    launch_time,
    precheck_work_dir,
    run_suffix,
)
from deflect.launch import job as slurm_job
from deflect.launch import submit as slurm_submit

if TYPE_CHECKING:
    from deflect.engine.distributed import DistInfo

log = logging.getLogger("run")
# The sweep folder's time stamp: one for every process of a torchrun launch.
OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True)
# configs/hydra/launcher/submitit_*.yaml are checked against the plugin's schema of the same
# name on purpose (a mistyped launcher key is an error); Hydra warns that this is deprecated.
warnings.filterwarnings("ignore", message=r"(?s).*'hydra/launcher/submitit_\w+' is validated")


def this_job() -> SweepJob:
    """The Hydra job: its number, sweep folder (multirun only) and command-line overrides."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return SweepJob(
        num=int(hydra_cfg.job.num) if multirun else 0,
        sweep_dir=str(hydra_cfg.sweep.dir) if multirun else "",
        overrides=list(hydra_cfg.overrides.task),
    )


def train(cfg: DictConfig, info: DistInfo, job: SweepJob) -> None:
    """Train, keep the best checkpoint, test it, export the adapter."""
    from deflect.engine import build, report
    from deflect.engine.distributed import barrier

    run = report.open_run(cfg, HydraConfig.get().runtime.choices, info, job)
    if run.finished:  # resume=true on a finished run: left untouched
        return
    if info.is_main:
        slurm_job.record_start(run.path)  # under SLURM: the job id, and each requeue
    work_dir = run.path
    started = False
    try:
        if job.sweep_dir:
            warn_unread(check_run_config(cfg))  # in the job's train.log
        task = build.build_task(cfg)  # once; handed to every part that asks it
        build.train_settings(cfg, task)  # a bad precision, epochs or monitor fails at once
        datasets = build.build_datasets(cfg, task)
        model = build.build_model(cfg, datasets["train"].spec, task).to(info.device)
        counts = report.describe_model(model, work_dir, info, datasets["train"], task)

        trainer = build.build_trainer(cfg, model, datasets, work_dir, info, task)
        if report.resuming(cfg, work_dir):
            trainer.resume(report.last_checkpoint(work_dir))
        started = True
        finished = trainer.fit()
        barrier(info)
        if not finished:
            log.info(
                "stopped after epoch %d as asked (stop_after_epochs); continue with "
                "resume=true work_dir=%s",
                cfg.stop_after_epochs,
                work_dir,
            )
            trainer.writer.close()
            return

        metrics = report.test_best(cfg, model, datasets["test"], work_dir, info, task,
                                   trainer.evaluator)  # fmt: skip
        report.close_run(
            cfg, model, metrics, counts, trainer.cost(), trainer.writer, trainer.settings.epochs,
            work_dir, info, task,
            extra={**report.encoder_checkpoint_record(model), **trainer.early_stopping_record()},
            keep_last=bool(cfg.keep_last),
        )  # fmt: skip
        if cfg.get("diagnostics") and info.is_main and not info.distributed:
            from deflect.engine.explain import explain_run

            explain_run(work_dir, "test", str(info.device.type), lock=False)  # held: run.lock
        elif cfg.get("diagnostics") and info.is_main:
            log.info("diagnostics=true runs in one process: python scripts/explain.py %s",
                     work_dir)  # fmt: skip
    except BaseException:
        if isinstance(sys.exc_info()[1], Exception):
            report.record_failure(work_dir, info)
        if not started and run.fresh and not job.sweep_dir and info.is_main:
            # A single run that failed while building (bad data, weights, settings): its
            # folder holds nothing but the log of the error, which the console has shown.
            run.release()
            shutil.rmtree(work_dir, ignore_errors=True)
            log.error("removed the run folder %s: the run failed before training", work_dir)
        raise
    finally:
        run.release()


def finished_run(cfg: DictConfig) -> tuple[Path, DictConfig]:
    """The folder and saved config of the run that ``eval_dir`` names, with the command line's
    overrides; fails at once (before torch is imported) on a folder that is not a finished run."""
    work_dir = Path(cfg.eval_dir).expanduser()
    run_cfg = eval_config(work_dir, HydraConfig.get().overrides.task, cfg.dataset)
    best_checkpoint(work_dir)  # a run that never finished an epoch
    return work_dir, run_cfg


def evaluate(work_dir: Path, run_cfg: DictConfig, info: DistInfo) -> None:
    """Re-evaluate a finished run on its test split from its saved config and best checkpoint."""
    from deflect.engine import build, report
    from deflect.engine.logging import setup_logging
    from deflect.engine.runtime import apply_runtime
    from deflect.engine.workdir import RunLock

    apply_runtime(run_cfg)  # the run's matmul precision: re-evaluation repeats its numbers
    setup_logging(None, info.is_main)
    # Evaluation rewrites the run's test outputs: never while another process writes the folder.
    lock = RunLock(work_dir).acquire() if info.is_main else None
    try:
        task = build.build_task(run_cfg)
        if run_cfg.get("cross_sensor"):  # another sensor's bands, mapped to the trained ones
            dataset, out_dir, extra = report.cross_sensor_dataset(run_cfg, work_dir, task)
        else:
            dataset, out_dir = build.build_dataset(run_cfg, "test", task=task), work_dir
            extra = None
        model = build.build_model(run_cfg, dataset.spec, task).to(info.device)
        report.test_best(run_cfg, model, dataset, work_dir, info, task, out_dir=out_dir,
                         extra=extra)  # fmt: skip
    finally:
        if lock is not None:
            lock.release()


def warn_unread(unread: list[str]) -> None:
    """Say which top-level keys no part of the framework reads (``+typo=...``)."""
    if unread:
        log.warning(
            "top-level key(s) %s are read by no part of the framework and have no effect (a "
            "typo? the known keys are in configs/config.yaml)", unread,
        )  # fmt: skip


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Entry point: one process or one torchrun rank; called once per job of a multirun."""
    job = this_job()
    # Bad values fail here, before any folder is made; in a sweep, inside the job's folder,
    # where failed.txt tells the ablation table why the job failed.
    unread = check_run_config(cfg) if not job.sweep_dir else []
    if unread:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")  # fmt: skip
        warn_unread(unread)
    finished = finished_run(cfg) if cfg.eval_dir else None
    if finished is not None:
        check_run_config(finished[1])
    elif not job.sweep_dir and int(os.environ.get("RANK", "0")) == 0:
        precheck_work_dir(cfg)  # a busy, taken or changed work_dir: said at once
    elif job.sweep_dir and cfg.resume and not cfg.work_dir:
        folder = job.folder(run_suffix(cfg, HydraConfig.get().runtime.choices))
        if is_finished(folder):  # resuming a sweep: its finished jobs cost nothing
            logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                                datefmt="%H:%M:%S", level=logging.INFO, stream=sys.stdout)  # fmt: skip
            log.info("%s has already finished (it has %s): left untouched. To train again, "
                     "start a new run in another folder", folder, FINISHED_MARKER)  # fmt: skip
            return
    if job.sweep_dir and not cfg.work_dir and not cfg.resume:
        folder = job.folder(run_suffix(cfg, HydraConfig.get().runtime.choices))
        # A requeued SLURM job (time limit, preemption) continues its own run from last.pt.
        cfg.resume = slurm_job.requeued_into(folder)
    slurm_job.export_rank_environment()  # each SLURM task of a multi-task job: one DDP rank
    from deflect.engine.distributed import barrier, cleanup_distributed, init_distributed
    from deflect.engine.logging import close_log_file
    from deflect.engine.runtime import apply_runtime

    apply_runtime(cfg)  # matmul precision, CPU allocator: before anything large is allocated
    info = init_distributed(cfg.device, (finished[1] if finished else cfg).get("dist_timeout"))
    if job.sweep_dir:  # later jobs of the sweep reuse the process group
        atexit.register(cleanup_distributed)
    try:
        if finished is not None:
            evaluate(*finished, info)
        else:
            train(cfg, info, job)
        # Every rank is done with collectives before the group goes away (a rank tearing gloo
        # down while another still works aborts the process). Not on errors: a failing rank
        # must exit, never wait here for the others.
        barrier(info)
    finally:
        close_log_file()  # this job's train.log ends here, not with the next job's launch
        if not job.sweep_dir:
            cleanup_distributed()


if __name__ == "__main__":
    slurm_submit.check_launcher(sys.argv[1:])  # hydra/launcher=submitit_*: the extra, sbatch
    slurm_submit.wire_launcher()  # hydra/launcher=submitit_slurm submits through deflect.launch
    main()
