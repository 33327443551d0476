"""The steps of a run around training: its folder, what is logged at start, testing the best
checkpoint, and the summary and exports at the end. Called by ``run.py`` in that order."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from deflect.engine import build
from deflect.engine.checkpoint import atomic_write_text, load_checkpoint, load_model_state
from deflect.engine.distributed import DistInfo, broadcast_object
from deflect.engine.evaluator import Evaluator
from deflect.engine.logging import ScalarWriter, metric_scalars, metrics_table, setup_logging
from deflect.engine.outputs import PredictionWriter
from deflect.engine.workdir import (
    SweepJob,
    best_checkpoint,
    choose_work_dir,
    resume_config_changes,
)

log = logging.getLogger("run")

#: Test metrics of the best checkpoint, written by training and by ``eval_dir`` alike.
TEST_METRICS = "test_metrics.json"
#: The job's number and command-line overrides (what tells the rows of an ablation apart).
JOB = "job.json"
#: Written when a run raises: the error and its traceback (the ablation table lists it).
FAILED = "failed.txt"


def open_run(cfg: DictConfig, choices: dict, info: DistInfo, job: SweepJob) -> Path:
    """Rank 0 chooses (and creates) the run folder and every rank receives it; logging goes
    there; ``job.json`` and ``config.yaml`` are written (a resumed run lists the settings it
    changes)."""
    sweep = job if job.sweep_dir else None
    chosen = choose_work_dir(cfg, choices, sweep) if info.is_main else None
    work_dir = Path(broadcast_object(chosen, info))
    setup_logging(work_dir, info.is_main)
    if info.is_main:
        (work_dir / FAILED).unlink(missing_ok=True)  # a resumed run starts clean
        record = {"num": job.num, "overrides": job.overrides, "sweep_dir": job.sweep_dir or None}
        atomic_write_text(json.dumps(record, indent=2), work_dir / JOB)
        saved = work_dir / "config.yaml"
        if resuming(cfg, work_dir) and saved.is_file():
            changes = resume_config_changes(OmegaConf.load(saved), cfg)
            if changes:
                log.warning(
                    "resuming %s with settings that differ from its saved config.yaml; the rest "
                    "of the run uses the new ones:\n  %s",
                    work_dir,
                    "\n  ".join(changes),
                )
        atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), saved)
        log.info("run folder: %s", work_dir)
    return work_dir


def last_checkpoint(work_dir: Path) -> Path:
    """Where a run keeps its full training state."""
    return work_dir / "checkpoints" / "last.pt"


def resuming(cfg: DictConfig, work_dir: Path) -> bool:
    """Whether this run continues from ``last.pt``."""
    return bool(cfg.resume) and last_checkpoint(work_dir).is_file()


def describe_model(model: nn.Module, work_dir: Path, info: DistInfo) -> dict:
    """Log the band table and the parameter counts; write ``params.json``."""
    counts = build.parameter_counts(model)
    if info.is_main:
        atomic_write_text(json.dumps(counts, indent=2), work_dir / "params.json")
        log.info("bands:\n%s", build.band_table(model))
        log.info(
            "parameters: encoder %s trainable (%.3f%% of the GFM's %s), decoder %s trainable; "
            "total %s trainable of %s",
            f"{counts['encoder_trainable']:,}",
            counts["encoder_trainable_percent"],
            f"{counts['gfm']:,}",
            f"{counts['decoder_trainable']:,}",
            f"{counts['trainable']:,}",
            f"{counts['total']:,}",
        )
    return counts


def test_best(
    cfg: DictConfig,
    model: nn.Module,
    dataset,
    work_dir: Path,
    info: DistInfo,
    evaluator: Evaluator | None = None,
) -> dict:
    """Load ``best.pt``, evaluate the test split (with the training run's evaluator when given),
    write ``test_metrics.json``, the picture panels and the GeoTIFF predictions; log the
    per-class table."""
    best = best_checkpoint(work_dir)
    state = load_checkpoint(best)
    load_model_state(model, state, str(best))
    writer = PredictionWriter(
        dataset, work_dir, int(cfg.num_vis), bool(cfg.save_predictions), info.is_main
    )
    evaluator = evaluator or Evaluator(build.eval_settings(cfg), dataset.spec, info)
    loader = build.build_loader(dataset, cfg, info, train=False)
    metrics = evaluator.evaluate(model, loader, desc="test", on_batch=writer)
    if info.is_main:
        metrics["checkpoint_epoch"] = int(state["epoch"]) + 1
        atomic_write_text(json.dumps(metrics, indent=2), work_dir / TEST_METRICS)
        writer.save_png(work_dir / "test_predictions.png")
        log.info(
            "test metrics (%s, best epoch %d)\n%s",
            work_dir.name,
            state["epoch"] + 1,
            metrics_table(metrics, f"test: {work_dir.name}"),
        )
    return metrics


def record_failure(work_dir: Path, info: DistInfo) -> None:
    """Write the error being handled to ``failed.txt`` (rank 0), so a sweep shows it: the
    exception line first, then the traceback."""
    if info.is_main:
        error = sys.exc_info()[1]
        head = "".join(traceback.format_exception_only(type(error), error)).strip()
        atomic_write_text(f"{head}\n\n{traceback.format_exc()}", work_dir / FAILED)


def close_run(
    model: nn.Module,
    metrics: dict,
    counts: dict,
    cost: dict,
    seconds: float,
    writer: ScalarWriter,
    epochs: int,
    work_dir: Path,
    info: DistInfo,
) -> None:
    """Write ``metrics.json`` (best validation, test, parameters, time), the test curves, and
    the adapter export (``adapter/<name>/``)."""
    if info.is_main:
        best_val = json.loads((work_dir / "best_val_metrics.json").read_text())
        summary = {
            "best_val": best_val,
            "test": metrics,
            "params": counts,
            "train_seconds": round(seconds, 1),
            **cost,
        }
        atomic_write_text(json.dumps(summary, indent=2), work_dir / "metrics.json")
        writer.scalars(metric_scalars("test", metrics), epochs)
        model.encoder.save_pretrained(work_dir / "adapter")
        log.info(
            "done: test mIoU %.2f; training %s images/s, peak memory %.0f MiB (%s); everything "
            "is in %s",
            100 * metrics["mIoU"],
            cost["train_images_per_s"],
            cost["peak_memory_mb"],
            cost["peak_memory_kind"],
            work_dir,
        )
    writer.close()
