"""Console and file logging and TensorBoard scalars (rank 0 only); the tables of metrics are the
tasks' own."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

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
