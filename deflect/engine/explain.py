"""What a trained run learned from the spectrum: input importance by occlusion, and what
DEFLECT's spectral stream does in each adapted block.

    from deflect.engine.explain import explain_run
    report = explain_run("work_dirs/<run>", split="test")

**Occlusion.** The run's own evaluation (its evaluator, windows, precision and split: the baseline
equals ``test_metrics.json``) is repeated with one input at a time replaced by its training mean:

* each band, everywhere it is valid (0 after the run's normalisation, which is the training mean);
* for DEFLECT, each per-pixel feature of the untangled patch embedding (its raw bands and its
  spectral indices), replaced inside UPE by its mean over training pixels, and each pixel-set
  statistic group (all the ``q90`` columns, say), replaced by its training mean.

The importance of an input is the drop of the task's headline metric (mIoU for segmentation, mF1
for classification), counted as a loss of quality for a lower-is-better one (an error that
grows): how much the model needed it. The measurements are :mod:`deflect.engine.probes`.

**Deflection.** Per adapted block, over the patch tokens of the split: the angle between the
untangled attention update δ_uAtt and the frozen one δ_RGB, the ratio ‖δ_uAtt‖ / ‖δ_RGB‖ (what soft
deflection constrains), the update actually added relative to the token ‖x‖, and the share of the
attention logits that comes from the spectral stream:

    (Q_P+Q_A)(K_P+K_A)ᵀ = Q_P K_Pᵀ + [Q_P K_Aᵀ + Q_A K_Pᵀ + Q_A K_Aᵀ]
    share = Σ|spectral terms| / (Σ|Q_P K_Pᵀ| + Σ|spectral terms|)      over patch-token queries
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from pathlib import Path

from deflect.engine.probes import (
    BandOcclusion,
    DeflectionRecorder,
    Occlusion,
    deflect_upe,
    occluded,
    occlusions,
    record_block_inputs,
    upe_training_means,
)

log = logging.getLogger(__name__)
#: Importable from here as before (:mod:`deflect.engine.probes` measures).
__all__ = [
    "BandOcclusion", "DeflectionRecorder", "Occlusion", "check_explainable", "deflect_upe",
    "explain_run", "importance_table", "input_label", "occluded", "record_block_inputs",
    "upe_training_means", "write_report",
]  # fmt: skip


# ---- the whole report ----------------------------------------------------------------------------
def check_explainable(run_dir: str | Path, allow_unfinished: bool = False) -> dict:
    """The record of the checkpoint :func:`explain_run` would explain (see
    :func:`deflect.engine.diagnostics.checkpoint_record`), said in the log; loudly for a run
    that has not finished.

    Raises:
        FileNotFoundError: not a run folder, or no ``best.pt`` yet.
        RuntimeError: the run has not finished (no ``metrics.json``) and ``allow_unfinished``
            is not set: its ``best.pt`` may still change.
    """
    from deflect.engine.checkpoint import load_checkpoint
    from deflect.engine.diagnostics import checkpoint_record, describe
    from deflect.engine.workdir import FINISHED_MARKER, best_checkpoint, eval_config, is_finished

    run_dir = Path(run_dir)
    cfg = eval_config(run_dir, [])
    best = best_checkpoint(run_dir)
    finished = is_finished(run_dir)
    epoch = int(load_checkpoint(best)["epoch"]) + 1
    record = checkpoint_record(run_dir, epoch, int(cfg.epochs), finished)
    if finished:
        log.info("explaining %s: %s", run_dir, describe(record))
    elif not allow_unfinished:
        raise RuntimeError(
            f"{run_dir} has not finished (no {FINISHED_MARKER}): its {describe(record)} is the "
            "best so far and changes if the run goes on. Finish the run first (python run.py "
            f"resume=true work_dir={run_dir}), or pass --allow-unfinished to explain this "
            "checkpoint as it is (nothing was written)"
        )
    else:
        log.warning(
            "explaining an UNFINISHED run (no %s): %s, %s. Its diagnostics record this "
            "checkpoint and are marked stale when best.pt changes", FINISHED_MARKER, run_dir,
            describe(record),
        )  # fmt: skip
    return record


def explain_run(
    run_dir: str | Path,
    split: str = "test",
    device: str = "auto",
    allow_unfinished: bool = False,
    lock: bool = True,
    checked: dict | None = None,
) -> dict:
    """Occlusion importance and (for DEFLECT) the deflection statistics of a finished run,
    written to ``<run>/diagnostics/``: ``importance.csv``, ``importance.png``,
    ``explain.json`` (with the checkpoint it came from) and ``deflection.png``; a table is
    appended to ``train.log``.

    Args:
        run_dir: the run folder.
        split: the split evaluated.
        device: ``auto``, ``cpu`` or ``cuda``.
        allow_unfinished: explain a run without ``metrics.json`` (its best checkpoint so far),
            with a warning saying which epoch.
        lock: claim the folder's lock while explaining (a folder a training run holds is
            refused). ``False`` only for a caller that holds it already (``run.py
            diagnostics=true``, ``scripts/explain.py``).
        checked: what :func:`check_explainable` returned for this run, when the caller
            already checked it (under the lock it holds).

    Raises:
        RunFolderBusy: another process (a training run) holds the folder.
        RuntimeError: the run has not finished and ``allow_unfinished`` is not set.
    """
    from deflect.engine.workdir import RunLock

    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    claim = RunLock(run_dir).acquire() if lock else None
    try:
        record = checked or check_explainable(run_dir, allow_unfinished)
        report = _explain(Path(run_dir), split, device)
        report["checkpoint"] = record
        write_report(Path(run_dir), report)
    finally:
        if claim is not None:
            claim.release()
    return report


def _explain(run_dir: Path, split: str, device: str) -> dict:
    """The report of :func:`explain_run`, computed (nothing written)."""
    from deflect.engine import build
    from deflect.engine.checkpoint import load_checkpoint, load_model_state
    from deflect.engine.distributed import DistInfo, resolve_device
    from deflect.engine.workdir import best_checkpoint, eval_config

    cfg = eval_config(run_dir, [])
    info = DistInfo(0, 1, 0, resolve_device(device))
    task = build.build_task(cfg)
    dataset = build.build_dataset(cfg, split, task=task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-weights warnings: the checkpoint replaces them
        model = build.build_model(cfg, dataset.spec, task).to(info.device)
    best = best_checkpoint(run_dir)
    load_model_state(model, load_checkpoint(best), str(best))
    model.eval()
    evaluator = build.build_evaluator(cfg, model.data, info, task)
    metric = task.headline
    sign = 1.0 if task.higher_is_better(metric) else -1.0  # a drop is a loss of quality
    loader = build.build_loader(dataset, cfg, info, train=False)
    upe = deflect_upe(model)

    recorder = DeflectionRecorder(model) if upe is not None else None
    hooks = record_block_inputs(model, recorder) if recorder else []
    try:
        if recorder:
            with recorder:
                baseline = evaluator.evaluate(model, loader, desc=f"{split} (baseline)")
        else:
            baseline = evaluator.evaluate(model, loader, desc=f"{split} (baseline)")
    finally:
        for hook in hooks:
            hook.remove()
    means = upe_training_means(model, build.build_dataset(cfg, "train", task=task)) if upe else {}
    rows = []
    for occlusion in occlusions(model, list(dataset.spec.bands)):
        with occluded(model, occlusion, means) as occluded_model:
            metrics = evaluator.evaluate(occluded_model, loader, desc=f"without {occlusion.name}")
        rows.append({
            "input": occlusion.name, "kind": occlusion.kind, "metric": metrics[metric],
            "drop": sign * (baseline[metric] - metrics[metric]),
        })  # fmt: skip
    return {
        "run": str(run_dir),
        "split": split,
        "metric": metric,
        "baseline": {metric: baseline[metric]},
        "importance": sorted(rows, key=lambda r: -r["drop"]),
        "deflection": recorder.summary() if recorder else [],
    }


def write_report(run_dir: Path, report: dict, spread: dict[str, list[float]] | None = None) -> None:
    """``diagnostics/`` files and the train.log table (see :func:`explain_run`); ``spread``:
    ``"<kind>:<input>" -> drops over seeds``, drawn as error bars (half the range)."""
    from deflect.engine.checkpoint import atomic_write_text
    from deflect.engine.diagnostics import describe
    from deflect.io import atomic_path

    out = Path(run_dir) / "diagnostics"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "importance.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["input", "kind", report["metric"], "drop"])
        for row in report["importance"]:
            writer.writerow(
                [row["input"], row["kind"], f"{row['metric']:.6f}", f"{row['drop']:.6f}"]
            )
    slim = {**report, "deflection": [{k: v for k, v in b.items() if k != "angles"}
                                     for b in report["deflection"]]}  # fmt: skip
    atomic_write_text(json.dumps(slim, indent=1), out / "explain.json")
    draw_importance(report, out / "importance.png", spread)
    if report["deflection"]:
        draw_deflection(report["deflection"], out / "deflection.png")
    table = importance_table(report)
    metric = report["metric"]
    source = report.get("checkpoint")
    source = f" ({describe(source)})" if source else ""
    log.info("what the model used (%s, %s %.2f)%s:\n%s", report["split"], metric,
             100 * report["baseline"][metric], source, table)  # fmt: skip
    from deflect.engine.logging import ScalarWriter

    writer = ScalarWriter(Path(run_dir) / "tensorboard")
    scalars = {f"diagnostics/drop_{r['kind']}/{r['input']}": 100 * r["drop"]
               for r in report["importance"]}  # fmt: skip
    for b in report["deflection"]:
        scalars[f"diagnostics/angle_median/block{b['block']}"] = b["angle"][1]
        scalars[f"diagnostics/added_over_x/block{b['block']}"] = b["added"][1]
        scalars[f"diagnostics/spectral_logit_share/block{b['block']}"] = b["share"]
    writer.scalars(scalars, 0)
    writer.close()
    train_log = Path(run_dir) / "train.log"
    if not _logged_to(train_log):  # run.py diagnostics=true: the line above went there already
        with open(train_log, "a") as f:
            f.write(f"\ndiagnostics ({report['split']}): drop of {metric} when an input is "
                    f"replaced by its training mean{source}\n{table}\n")  # fmt: skip


def _logged_to(path: Path) -> bool:
    """Whether the root logger already writes to ``path`` (a training run's ``train.log``)."""
    target = path.resolve()
    return any(isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == target
               for h in logging.getLogger().handlers)  # fmt: skip


#: How the pictures and tables name each kind of input: a band and the UPE feature computed
#: from it share a name (B8), so they are told apart.
KIND_LABELS = {"band": "band", "feature": "UPE feature", "statistic": "UPE statistic"}


def input_label(row: dict) -> str:
    """``B8 (band)``, ``UPE: B8`` (the raw-band feature inside UPE), ``UPE: NDVI``, ``UPE
    stat: q10``."""
    if row["kind"] == "band":
        return f"{row['input']} (band)"
    return f"UPE: {row['input']}" if row["kind"] == "feature" else f"UPE stat: {row['input']}"


def importance_table(report: dict, top: int = 12) -> str:
    """The ``top`` most important inputs, a line each, under a line saying how many there are."""
    every = report["importance"]
    rows = every[:top]
    width = max(len(r["input"]) for r in rows) if rows else 5
    head = (f"  top {len(rows)} of {len(every)} inputs; all in diagnostics/importance.csv"
            if len(rows) < len(every) else f"  all {len(every)} inputs")  # fmt: skip
    return "\n".join([head] + [
        f"  {r['input']:<{width}}  {KIND_LABELS[r['kind']]:<13}  drop {100 * r['drop']:+7.2f}"
        for r in rows
    ])  # fmt: skip


def draw_importance(report: dict, path: Path, spread: dict[str, list[float]] | None = None) -> None:
    """Sorted bars of the metric drop per input (coloured by kind), with the seed spread, and a
    caption saying what each kind of input and each statistic name (``q10``) is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from deflect.io import atomic_path

    rows = report["importance"]
    colours = {"band": "C0", "feature": "C3", "statistic": "C2"}
    kinds = [k for k in colours if any(r["kind"] == k for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.35 * len(rows) + 2), 5.0), dpi=120)
    values = [100 * r["drop"] for r in rows]
    errors = None
    if spread:
        keys = [f"{r['kind']}:{r['input']}" for r in rows]  # a band and its feature: apart
        errors = [100 * (max(spread[k]) - min(spread[k])) / 2 if len(spread.get(k, [])) > 1
                  else 0 for k in keys]  # fmt: skip
    ax.bar(range(len(rows)), values, color=[colours[r["kind"]] for r in rows], yerr=errors,
           capsize=3)  # fmt: skip
    ax.set_xticks(range(len(rows)), [input_label(r) for r in rows], rotation=70, ha="right",
                  fontsize=8)  # fmt: skip
    metric = report["metric"]
    ax.set_ylabel(f"drop of {report['split']} {metric} (points)")
    title = (f"input importance by occlusion ({report['split']} {metric} "
             f"{100 * report['baseline'][metric]:.2f} without occlusion)")  # fmt: skip
    record = report.get("checkpoint") or {}
    if record and not record.get("run_finished", True):
        title += f"\nUNFINISHED run: best.pt of epoch {record['epoch']} of {record['epochs']}"
    ax.set_title(title, fontsize=9)
    names = {"band": "band (model input)", "feature": "UPE: per-pixel feature in DEFLECT's "
             "patch embedding", "statistic": "UPE stat: one pixel-set statistic of every feature"}  # fmt: skip
    ax.legend(handles=[Patch(color=colours[k], label=names[k]) for k in kinds], fontsize=7,
              loc="upper right")  # fmt: skip
    ax.axhline(0, color="k", linewidth=0.5)
    ax.grid(True, axis="y", alpha=0.3)
    caption = ("Each input replaced by its training mean, one at a time; the bar is how much "
               f"{metric} fell. UPE (untangled patch embedding) computes per-pixel features (the "
               "raw bands and spectral indices) and summarises each over a patch's pixels by "
               "pixel-set statistics: mean, std, min, max, and qNN = the NN-th percentile of the "
               "patch's pixels (q10: 10th, q75: 75th).")  # fmt: skip
    if "statistic" in kinds or "feature" in kinds:
        fig.text(0.01, 0.01, caption, fontsize=7, wrap=True, va="bottom")
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def draw_deflection(blocks: list[dict], path: Path) -> None:
    """Per adapted block, in a panel of its own (same axes): the distribution of the angle
    between δ_uAtt and δ_RGB over patch tokens, with its median, the added update and the
    spectral share of the attention logits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deflect.io import atomic_path

    shown = [row for row in blocks if row["angles"]]
    fig, axes = plt.subplots(max(len(shown), 1), 1, figsize=(6.5, 1.2 + 1.5 * max(len(shown), 1)),
                             dpi=120, sharex=True, sharey=True, squeeze=False)  # fmt: skip
    for i, (ax, row) in enumerate(zip(axes[:, 0], shown)):
        ax.hist(row["angles"], bins=45, range=(0, 180), color=f"C{i % 10}", alpha=0.8)
        ax.axvline(row["angle"][1], color="k", linewidth=1, linestyle="--")
        ax.text(0.99, 0.92, f"block {row['block']}: median {row['angle'][1]:.0f}°, added "
                f"{row['added'][1]:.2f}·‖x‖, spectral logits {100 * row['share']:.0f} %",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)  # fmt: skip
        ax.set_ylabel("tokens", fontsize=8)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlim(0, 180)
    axes[-1, 0].set_xlabel("angle between δ_uAtt and δ_RGB (degrees; dashed: median)")
    fig.suptitle("deflection per adapted block (patch tokens of the split)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
