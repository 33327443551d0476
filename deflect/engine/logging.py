"""Console and file logging, TensorBoard scalars and the per-class metrics table (rank 0 only)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

log = logging.getLogger("deflect")


def setup_logging(work_dir: Path | None, is_main: bool) -> None:
    """INFO to the console and ``<work_dir>/train.log`` on rank 0; warnings only elsewhere."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    root.addHandler(console)
    if work_dir is not None and is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(work_dir / "train.log")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    # Warnings (random weights, dropped checkpoint keys, ...) go to the console and train.log as
    # one line each, without the file/line noise of the default format.
    warnings.showwarning = _log_warning


def close_log_file() -> None:
    """Detach and close the root logger's file handlers (the run's ``train.log``) when a run or
    a sweep's job ends: otherwise what comes next in the process (Hydra's line launching the
    next job) is written into this job's log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message)


class ScalarWriter:
    """TensorBoard scalars on rank 0; does nothing on other ranks."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step``."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()


def metric_scalars(prefix: str, metrics: dict) -> dict[str, float]:
    """TensorBoard tags for the means and each class's IoU."""
    out = {f"{prefix}/{k}": metrics[k] for k in ("mIoU", "mF1", "mPrecision", "mRecall", "OA")}
    for name, values in metrics["per_class"].items():
        out[f"{prefix}_IoU/{name}"] = values["IoU"]
    return out


def metrics_table(metrics: dict, title: str) -> str:
    """The per-class table and the means, as text (also written to the log)."""
    table = Table(title=title)
    for column in ("class", "IoU", "F1", "Precision", "Recall", "pixels"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    for name, values in metrics["per_class"].items():
        table.add_row(
            name,
            fmt(values["IoU"]),
            fmt(values["F1"]),
            fmt(values["Precision"]),
            fmt(values["Recall"]),
            str(values["support"]),
        )
    table.add_section()
    table.add_row(
        "mean",
        fmt(metrics["mIoU"]),
        fmt(metrics["mF1"]),
        fmt(metrics["mPrecision"]),
        fmt(metrics["mRecall"]),
        str(metrics["pixels"]),
    )
    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    text += f"overall accuracy (OA): {fmt(metrics['OA'])}"
    if metrics["absent_classes"]:
        text += f"; {metrics['absent_classes']} class(es) absent from this split, left out of means"
    return text


def classification_table(metrics: dict, title: str, multi_label: bool = False) -> str:
    """The per-class table of an image-level evaluation and its means, as text."""
    table = Table(title=title)
    columns = ["class", "F1", "Precision", "Recall", *(["AP"] if multi_label else []), "samples"]
    for column in columns:
        table.add_column(column, justify="left" if column == "class" else "right")

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    for name, values in metrics["per_class"].items():
        table.add_row(
            name, fmt(values["F1"]), fmt(values["Precision"]), fmt(values["Recall"]),
            *([fmt(values["AP"])] if multi_label else []), str(values["support"]),
        )  # fmt: skip
    table.add_section()
    table.add_row(
        "mean", fmt(metrics["mF1"]), fmt(metrics["mPrecision"]), fmt(metrics["mRecall"]),
        *([fmt(metrics["mAP"])] if multi_label else []), str(metrics["samples"]),
    )  # fmt: skip
    console = Console(width=100, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    text = console.export_text()
    if multi_label:
        text += (f"micro F1: {fmt(metrics['microF1'])}, mAP: {fmt(metrics['mAP'])} (labels at "
                 f"probability >= {metrics['threshold']:g})")  # fmt: skip
    else:
        text += f"overall accuracy (OA): {fmt(metrics['OA'])}"
    if metrics["absent_classes"]:
        text += f"; {metrics['absent_classes']} class(es) absent from this split, left out of means"
    return text
