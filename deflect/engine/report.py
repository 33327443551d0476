"""The steps of a run around training: its folder, what is logged at start, testing the best
checkpoint, and the summary and exports at the end. Called by ``run.py`` in that order."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from deflect.engine import build
from deflect.engine.checkpoint import atomic_write_text, load_checkpoint, load_model_state
from deflect.engine.diagnostics import staleness
from deflect.engine.distributed import DistInfo, broadcast_object, explain_stall
from deflect.engine.evaluator import Evaluator
from deflect.engine.logging import ScalarWriter, setup_logging
from deflect.engine.workdir import (
    FINISHED_MARKER,
    RunFolder,
    SweepJob,
    best_checkpoint,
    choose_work_dir,
    remove_stale_temporaries,
    resume_changes,
)
from deflect.tasks import Task

log = logging.getLogger("run")

#: Test metrics of the best checkpoint, written by training and by ``eval_dir`` alike.
TEST_METRICS = "test_metrics.json"
#: The job's number and command-line overrides (what tells the rows of an ablation apart).
JOB = "job.json"
#: Written when a run raises: the error and its traceback (the ablation table lists it).
FAILED = "failed.txt"


def open_run(cfg: DictConfig, choices: dict, info: DistInfo, job: SweepJob) -> RunFolder:
    """Rank 0 chooses and claims (locks) the run folder and every rank receives it; logging goes
    there; ``job.json`` and ``config.yaml`` are written.

    A finished run named by ``resume=true`` is left untouched (``RunFolder.finished``: nothing is
    written). Resuming with settings that differ from the saved ``config.yaml`` is refused,
    naming them, unless ``resume_allow_changes=true``.

    Raises:
        RuntimeError, FileExistsError, ValueError: on every rank when rank 0 cannot claim the
            folder (another process holds it, it holds a run and resume is not set, ...).
    """
    sweep = job if job.sweep_dir else None
    claimed: RunFolder | None = None
    outcome: tuple[str, str, bool] | None = None
    if info.is_main:
        try:
            claimed = choose_work_dir(cfg, choices, sweep)
            if not claimed.finished and resuming(cfg, claimed.path):
                check_resume_changes(cfg, claimed.path)
            if not claimed.finished:
                for old in claimed.path.glob("failed*.txt"):
                    old.unlink(missing_ok=True)  # a resumed run starts clean
            outcome = ("ok", str(claimed.path), claimed.finished)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            if claimed is not None:
                claimed.release()
            outcome = ("error", f"{type(err).__name__}: {err}", False)
            if not info.distributed:
                raise
            broadcast_object(outcome, info)
            raise
    status, value, finished = broadcast_object(outcome, info)
    if status == "error":
        raise RuntimeError(f"rank 0 could not open the run folder: {value}")
    work_dir = Path(value)
    run = claimed or RunFolder(work_dir, None, finished)
    if finished:
        setup_logging(None, info.is_main)
        if info.is_main:
            log.info(
                "%s has already finished (it has %s): left untouched. To train again, start "
                "a new run in another folder", work_dir, FINISHED_MARKER,
            )  # fmt: skip
        return run
    setup_logging(work_dir, info.is_main)
    if info.is_main:
        remove_stale_temporaries(work_dir)  # this process holds the folder: they are garbage
        record = {"num": job.num, "overrides": job.overrides, "sweep_dir": job.sweep_dir or None}
        atomic_write_text(json.dumps(record, indent=2), work_dir / JOB)
        atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), work_dir / "config.yaml")
        log.info("run folder: %s", work_dir)
    return run


def check_resume_changes(cfg: DictConfig, work_dir: Path) -> None:
    """Refuse to resume with changed settings (:func:`~deflect.engine.workdir.resume_changes`);
    with ``resume_allow_changes=true``, log them."""
    changes = resume_changes(cfg, work_dir)
    if changes:
        log.warning(
            "resuming %s with settings that differ from its saved config.yaml "
            "(resume_allow_changes=true); the rest of the run uses the new ones:\n  %s",
            work_dir, "\n  ".join(changes),
        )  # fmt: skip


def last_checkpoint(work_dir: Path) -> Path:
    """Where a run keeps its full training state."""
    return work_dir / "checkpoints" / "last.pt"


def resuming(cfg: DictConfig, work_dir: Path) -> bool:
    """Whether this run continues from ``last.pt``."""
    return bool(cfg.resume) and last_checkpoint(work_dir).is_file()


def describe_model(model: nn.Module, work_dir: Path, info: DistInfo, dataset, task: Task) -> dict:
    """Log the band table (with the file band each came from, when ``dataset`` renamed any)
    and the parameter counts; write ``params.json`` and the task's records of the training
    data (:meth:`~deflect.tasks.Task.run_records`, e.g. the image size ``scripts/predict.py``
    tiles scenes by)."""
    counts = build.parameter_counts(model)
    if info.is_main:
        atomic_write_text(json.dumps(counts, indent=2), work_dir / "params.json")
        for name, record in task.run_records(dataset).items():
            atomic_write_text(json.dumps(record), work_dir / name)
        sources = getattr(dataset, "band_sources", None)
        log.info("bands:\n%s", build.band_table(model, sources))
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
    task: Task,
    evaluator: Evaluator | None = None,
    out_dir: Path | None = None,
    extra: dict | None = None,
) -> dict:
    """Load ``best.pt``, evaluate the test split (with the training run's evaluator when given),
    write ``test_metrics.json`` (with ``extra``, e.g. a cross-sensor band mapping) and the
    task's outputs (predictions, pictures) into ``out_dir`` (default: the run folder); log the
    task's table."""
    out_dir = Path(out_dir or work_dir)
    best = best_checkpoint(work_dir)
    state = load_checkpoint(best)
    load_model_state(model, state, str(best))
    writer = task.writer(dataset, out_dir, int(cfg.num_vis), bool(cfg.save_predictions),
                         info.is_main, info)  # fmt: skip
    evaluator = evaluator or build.build_evaluator(cfg, model.data, info, task)  # as in training
    loader = build.build_loader(dataset, cfg, info, train=False)
    metrics = evaluator.evaluate(model, loader, desc="test", on_batch=writer)
    writer.finish(out_dir)  # every rank: the task's outputs may gather across ranks
    if info.is_main:
        metrics["checkpoint_epoch"] = int(state["epoch"]) + 1
        metrics.update(extra or {})
        atomic_write_text(json.dumps(metrics, indent=2), out_dir / TEST_METRICS)
        task.test_pictures(metrics, dataset.spec, out_dir)
        name = work_dir.name if out_dir == work_dir else f"{work_dir.name} on {out_dir.name}"
        log.info(
            "test metrics (%s, best epoch %d)\n%s",
            name,
            state["epoch"] + 1,
            task.table(metrics, f"test: {name}"),
        )
    return metrics


class AnyBand(Mapping):
    """A statistics table holding ``value`` for every band: the other sensor's dataset of a
    cross-sensor evaluation needs no statistics of its own (the trained ones normalise), so
    none are read, computed or cached in its folder."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __getitem__(self, band: str) -> float:
        return self.value

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def cross_sensor_folder(work_dir: Path, dataset: str, sensor: str, root: str | Path) -> Path:
    """Where a cross-sensor evaluation of the data folder ``root`` goes:
    ``cross_sensor/<dataset>_<sensor>/`` (``dataset``: the dataset config's name), unless that
    folder holds the results of another data folder; then the first of ``<dataset>_<sensor>_2``,
    ``_3``, ... that is free or holds this one's. Results are never overwritten by another
    folder's."""
    root = str(Path(root).expanduser().resolve())
    base = f"{dataset}_{sensor}"
    for number in range(1, 1000):
        folder = work_dir / "cross_sensor" / (base if number == 1 else f"{base}_{number}")
        try:
            saved = json.loads((folder / TEST_METRICS).read_text())
        except (OSError, ValueError):
            saved = None
        if saved is None and not folder.exists():
            return folder
        if isinstance(saved, dict) and saved.get("root") == root:
            return folder
        held = saved.get("root") if isinstance(saved, dict) else None
        log.info("%s holds the results of %s; those of %s go to the next free name",
                 folder.relative_to(work_dir), held or "another folder", root)  # fmt: skip
    raise ValueError(f"{work_dir / 'cross_sensor'} holds 999 evaluations of {base}; clear it")


def cross_sensor_dataset(cfg: DictConfig, work_dir: Path, task: Task):
    """Another sensor's test split (``cfg.dataset``, whose config name ``cfg.cross_sensor``
    holds) seen through the bands the run was trained on.

    The trained bands come from the best checkpoint's band manifest; each is matched with a band
    of the dataset (:func:`~deflect.data.map_bands`: the same spyndex band, or the nearest
    centre within its width), the mapping is logged as a table, values are converted to the
    trained reflectance scale (reflectance is physical: the trained statistics normalise, so the
    dataset's own are never computed, and nothing is written into its folder), and the results
    go to ``cross_sensor/<dataset>_<sensor>/`` (:func:`cross_sensor_folder`).

    Returns:
        ``(mapped dataset, output folder, {"band_mapping": [...], "root": ..., ...})``.

    Raises:
        ValueError: a trained band without a counterpart (named), or other classes.
    """
    from datasets import BandMappedDataset
    from deflect.data import DataSpec, map_bands

    dataset = build.build_dataset(cfg, "test", {"mean": AnyBand(0.0), "std": AnyBand(1.0)}, task)
    state = load_checkpoint(best_checkpoint(work_dir))
    trained = DataSpec.from_dict(json.loads(state["data"]))
    given = dataset.spec
    if list(given.classes) != list(trained.classes):
        raise ValueError(
            f"the run was trained on classes {list(trained.classes)}, the dataset has "
            f"{list(given.classes)}; cross-sensor evaluation needs the same classes, in order"
        )
    mapping = map_bands(trained.bands, trained.sensor, given.bands, given.sensor)
    lines = [f"  {t:<5} <- {g:<5}  {tw:7.1f} nm <- {gw:7.1f} nm" if tw else f"  {t:<5} <- {g}"
             for t, g, tw, gw in mapping]  # fmt: skip
    log.info("bands of %s (dataset=%s, %s) mapped to the trained %s bands:\n%s",
             cfg.dataset.get("root"), cfg.cross_sensor, given.sensor, trained.sensor,
             "\n".join(lines))  # fmt: skip
    mapped = BandMappedDataset(dataset, [g for _, g, _, _ in mapping], trained)
    # The trained statistics normalise, as in training.
    mapped.transform = task.transform(trained, False, int(cfg.img_size))
    name = str(cfg.cross_sensor)  # the dataset config's name (dataset=<name>)
    root = Path(str(cfg.dataset.get("root") or dataset.root)).expanduser().resolve()
    record = [{"trained": t, "given": g, "trained_nm": tw, "given_nm": gw}
              for t, g, tw, gw in mapping]  # fmt: skip
    extra = {"band_mapping": record, "sensor": given.sensor, "trained_sensor": trained.sensor,
             "dataset": name, "root": str(root)}  # fmt: skip
    return mapped, cross_sensor_folder(work_dir, name, given.sensor, root), extra


def record_failure(work_dir: Path, info: DistInfo) -> Path | None:
    """Write the error being handled to the run folder, so a sweep (and its table) shows it:
    the exception line first, then the traceback.

    Every rank records its own error. The first rank to fail writes ``failed.txt`` (created
    exclusively, so a later "connection closed by peer" on rank 0 cannot replace the real
    cause); a rank that fails after it writes ``failed.rank<N>.txt``. A rank other than 0 also
    appends its error to ``train.log``.

    Returns:
        The file written (None when nothing could be written).
    """
    error = sys.exc_info()[1]
    head = "".join(traceback.format_exception_only(type(error), error)).strip()
    stall = explain_stall(error, info)
    if stall:  # a collective's timeout says nothing of who stopped: name the rank first
        log.error("%s", stall)
        head = f"{stall}\n(the timeout: {head})"
    where = f"rank {info.rank} of {info.world_size}: " if info.distributed else ""
    text = f"{head}\n\n{where}{traceback.format_exc()}"
    try:
        if not info.distributed:
            atomic_write_text(text, work_dir / FAILED)
            return work_dir / FAILED
        try:
            with open(work_dir / FAILED, "x") as f:  # the first rank to fail
                f.write(text)
            path = work_dir / FAILED
        except FileExistsError:
            path = work_dir / f"failed.rank{info.rank}.txt"
            atomic_write_text(text, path)
            if info.is_main:
                log.error(
                    "rank 0 stopped after another rank failed (its error is in %s): %s",
                    work_dir / FAILED, head,
                )  # fmt: skip
        if not info.is_main:
            with open(work_dir / "train.log", "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} ERROR rank {info.rank}: {text}\n")
        return path
    except OSError as err:  # a full disk, a vanished folder: the console still has the error
        log.error("could not record the failure in %s: %s", work_dir, err)
        return None


def close_run(
    cfg: DictConfig,
    model: nn.Module,
    metrics: dict,
    counts: dict,
    cost: dict,
    writer: ScalarWriter,
    epochs: int,
    work_dir: Path,
    info: DistInfo,
    task: Task,
    extra: dict | None = None,
    keep_last: bool = False,
) -> None:
    """Export the adapter (``adapter/<name>/``), write the test curves and, last, ``metrics.json``
    (best validation, test, parameters, cost, and ``extra`` such as the encoder checkpoint's
    coverage): its presence marks the run finished. Unless ``keep_last``, ``last.pt`` (the
    optimiser state, only needed to continue an unfinished run) is then deleted."""
    if info.is_main:
        best_val = json.loads((work_dir / "best_val_metrics.json").read_text())
        model.encoder.save_pretrained(work_dir / "adapter")
        writer.scalars(task.scalars("test", metrics), epochs)
        summary = {"best_val": best_val, "test": metrics, "params": counts, **cost,
                   **(extra or {})}  # fmt: skip
        atomic_write_text(json.dumps(summary, indent=2), work_dir / FINISHED_MARKER)
        last = last_checkpoint(work_dir)
        if not keep_last and last.is_file():
            size = last.stat().st_size
            last.unlink()
            log.info("deleted %s (%.0f MB of optimiser state; keep_last=true keeps it)", last,
                     size / 1e6)  # fmt: skip
        stale = staleness(work_dir)  # explained before a resume, and best.pt changed since
        if stale:
            log.warning("%s/diagnostics/ are stale: %s. Re-run python scripts/explain.py %s "
                        "(the ablation table leaves them out until then)", work_dir, stale,
                        work_dir)  # fmt: skip
        log.info(
            "done: test %s; training %s images/s, peak memory %.0f MiB (%s); everything is in %s",
            task.log_line(metrics),
            cost["train_images_per_s"],
            cost["peak_memory_mb"],
            cost["peak_memory_kind"],
            work_dir,
        )
    writer.close()


def encoder_checkpoint_record(model: nn.Module) -> dict:
    """What the encoder checkpoint supplied, for ``metrics.json``: its path and coverage, or
    ``null`` on random weights."""
    encoder = model.encoder.base_model
    report = getattr(encoder, "checkpoint_report", None)
    if report is None:
        return {"encoder_checkpoint": None}
    keep = ("path", "loaded", "total", "coverage")
    return {"encoder_checkpoint": {**{k: report[k] for k in keep},
                                   "missing": len(report["missing"])}}  # fmt: skip
