"""Run folders: ``<work_root>/<time>_<encoder>_<finetune>_<dataset>/``, decided by rank 0 only,
and locked by the one process that writes them. The run's settings, checked and rebuilt, are in
:mod:`deflect.engine.run_config` (its names are importable from here too)."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from deflect.engine.run_config import (
    BOOKKEEPING_KEYS,
    CONFIG_GROUPS,
    KNOWN_KEYS,
    RUN_SETTINGS,
    check_run_config,
    check_targets,
    eval_config,
    resume_config_changes,
    target_problem,
)

log = logging.getLogger(__name__)

#: The run's settings, importable from here as before (:mod:`deflect.engine.run_config`).
__all__ = [
    "BOOKKEEPING_KEYS", "CONFIG_GROUPS", "KNOWN_KEYS", "RUN_SETTINGS", "check_run_config",
    "check_targets", "eval_config", "resume_config_changes", "target_problem",
]  # fmt: skip


def _launcher_start() -> float | None:
    """When torchrun (the parent of every local rank) started, from ``/proc`` (Linux)."""
    try:
        with open(f"/proc/{os.getppid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def launch_time(pattern: str = "%Y%m%d-%H%M%S") -> str:
    """The time stamp of this launch, formatted with ``pattern``: under torchrun, when torchrun
    started, so every rank names the same sweep folder; otherwise now. Registered as the
    ``launch_time`` resolver of ``hydra.sweep.dir``."""
    start = _launcher_start() if "LOCAL_RANK" in os.environ else None
    return time.strftime(pattern, time.localtime(start if start is not None else time.time()))


def run_suffix(cfg: DictConfig, choices: dict) -> str:
    """``<encoder>_<finetune>_<dataset>`` from the chosen config files."""
    return "_".join(
        str(choices.get(group) or "custom") for group in ("encoder", "finetune", "dataset")
    )


@dataclass(frozen=True)
class SweepJob:
    """One job of a Hydra multirun (``python run.py -m ...``): its number, the sweep folder and
    the job's own command-line overrides."""

    num: int
    sweep_dir: str
    overrides: list[str]

    def folder(self, suffix: str) -> Path:
        """``<sweep_dir>/<NNN>_<encoder>_<finetune>_<dataset>``."""
        return Path(self.sweep_dir).expanduser() / f"{self.num:03d}_{suffix}"


#: The lock file of a run folder: held (``flock``) by the one process that writes the folder.
LOCK = ".lock"
#: Written last when a run has finished (tested, exported): a finished run is never rewritten.
FINISHED_MARKER = "metrics.json"
#: Temporary files of interrupted atomic writes (``deflect.io.atomic_path``): ``.<name>.<8
#: random characters>.tmp<suffix>``.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


class RunFolderBusy(RuntimeError):
    """The run folder is held by another live process."""


class RunLock:
    """An exclusive claim on a run folder, so that two processes never write one folder.

    ``<folder>/.lock`` is locked with ``flock``, which the kernel releases when the holder
    exits, however it exits (a crash or SIGKILL leaves nothing stuck). The file holds the
    holder's pid, host, start time and command line, for the message a second process gets.

    Args:
        folder: the run folder (created if needed).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._file = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunFolderBusy` naming the holder."""
        import fcntl
        import json
        import socket
        import sys

        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            text = handle.read()
            handle.close()
            try:
                holder = json.loads(text)
                who = (
                    f"pid {holder['pid']} on {holder['host']}, started {holder['started']} "
                    f"({holder['command']})"
                )
            except (ValueError, KeyError, TypeError):
                who = "a process that has not yet written its name"
            raise RunFolderBusy(
                f"run folder {str(self.folder)!r} is in use by another run: {who}. Wait for "
                "it to finish, or choose another work_dir (nothing here was changed)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }))  # fmt: skip
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        """Give the folder up (also done by the kernel when the process ends)."""
        if self._file is not None:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._file is not None


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run's results (a checkpoint, or a finished run's metrics)."""
    return any(
        (folder / name).is_file()
        for name in ("checkpoints/last.pt", "checkpoints/best.pt", FINISHED_MARKER)
    )


def is_finished(folder: Path) -> bool:
    """Whether the run in ``folder`` finished: trained, tested and exported."""
    return (folder / FINISHED_MARKER).is_file()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files interrupted writes (a SIGKILL during a checkpoint write) left
    in a run folder. Only call it while holding the folder's :class:`RunLock`: then no other
    process is writing them."""
    removed = []
    for sub in (folder, folder / "checkpoints", folder / "predictions"):
        if not sub.is_dir():
            continue
        for path in sub.iterdir():
            if path.is_file() and _TEMPORARY.match(path.name):
                size = path.stat().st_size
                path.unlink(missing_ok=True)
                removed.append(path)
                log.warning(
                    "removed %s (%.1f MB), left by a write that was interrupted", path, size / 1e6
                )
    return removed


@dataclass
class RunFolder:
    """The folder a run writes, claimed by this process.

    Args:
        path: the folder.
        lock: its lock, held until :meth:`release`.
        finished: it holds a finished run (``resume=true`` then leaves it untouched).
        fresh: this process created it (nothing was in it before).
    """

    path: Path
    lock: RunLock | None
    finished: bool = False
    fresh: bool = False

    def release(self) -> None:
        """Release the lock."""
        if self.lock is not None:
            self.lock.release()


def _claim(folder: Path, resume: bool, fix: str, fresh: bool = False) -> RunFolder:
    """Lock a named run folder; one that holds a run is refused unless resuming."""
    folder = folder.expanduser()
    fresh = fresh or not folder.exists()
    lock = RunLock(folder).acquire()
    if holds_run(folder) and not resume:
        lock.release()
        raise FileExistsError(f"{folder} already holds a run; {fix} (nothing was overwritten)")
    return RunFolder(folder, lock, finished=resume and is_finished(folder), fresh=fresh)


def precheck_work_dir(cfg: DictConfig) -> None:
    """Before anything heavy is imported: refuse at once an explicit ``work_dir`` that another
    process holds, that holds a run without ``resume=true``, or whose saved config differs from
    this resume's settings. (The folder is claimed for real later; these are the same checks.)

    Raises:
        RunFolderBusy, FileExistsError, ValueError: as the claim itself would.
    """
    if not cfg.get("work_dir"):
        return
    folder = Path(cfg.work_dir).expanduser()
    if not folder.is_dir():
        return
    if (folder / LOCK).is_file():
        RunLock(folder).acquire().release()
    if holds_run(folder) and not cfg.resume:
        raise FileExistsError(
            f"{folder} already holds a run; pass resume=true to continue it, or choose another "
            "work_dir (nothing was overwritten)"
        )
    if cfg.resume and holds_run(folder) and not is_finished(folder):
        resume_changes(cfg, folder)


def resume_changes(cfg: DictConfig, folder: Path) -> list[str]:
    """The settings a resume of ``folder`` changes against its saved ``config.yaml``
    (``key: saved -> current``); refused unless ``resume_allow_changes=true``, since the
    weights were trained with the saved ones.

    Raises:
        ValueError: naming every changed setting and both ways out.
    """
    saved = folder / "config.yaml"
    if not saved.is_file():
        return []
    changes = resume_config_changes(OmegaConf.load(saved), cfg)
    if changes and not cfg.get("resume_allow_changes", False):
        listing = "\n  ".join(changes)
        raise ValueError(
            f"resuming {folder} with settings that differ from its saved config.yaml, which its "
            f"weights were trained with:\n  {listing}\nResume with the saved settings (drop "
            "those overrides), or pass resume_allow_changes=true to go on with the new ones "
            "(config.yaml is then rewritten and the change logged)"
        )
    return changes


def choose_work_dir(cfg: DictConfig, choices: dict, job: SweepJob | None = None) -> RunFolder:
    """The run folder, claimed: in a multirun, the job's folder in the sweep folder; else
    ``work_dir`` if given, the newest matching run on ``resume=true``, or a new timestamped
    folder. Called on rank 0 only; the path is broadcast.

    Raises:
        RunFolderBusy: another live process writes the folder.
        FileExistsError: the folder holds a run and ``resume`` is not set.
    """
    suffix = run_suffix(cfg, choices)
    if job is not None:
        if cfg.work_dir:
            raise ValueError(
                "work_dir names one run folder, but a multirun (-m) makes one per job; drop "
                "work_dir, and use hydra.sweep.dir=... to choose the sweep folder"
            )
        return _claim(
            job.folder(suffix), bool(cfg.resume), "pass resume=true to continue the sweep"
        )
    if cfg.work_dir:
        return _claim(Path(cfg.work_dir), bool(cfg.resume),
                      "pass resume=true to continue it, or choose another work_dir")  # fmt: skip
    root = Path(cfg.work_root).expanduser()
    if cfg.resume:
        runs = sorted(p for p in root.glob(f"*_{suffix}") if p.is_dir() and holds_run(p))
        if runs:
            return _claim(runs[-1], True, "")
        log.warning(
            "resume=true but no run *_%s in %s has a checkpoint: starting anew", suffix, root
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    n = 0
    while True:  # mkdir is the claim: two runs started in the same second get two folders
        work_dir = root / (f"{stamp}_{suffix}" if n == 0 else f"{stamp}-{n}_{suffix}")
        try:
            work_dir.mkdir(parents=True)
        except FileExistsError:
            n += 1
            continue
        return _claim(work_dir, False, "", fresh=True)


def best_checkpoint(work_dir: Path) -> Path:
    """``checkpoints/best.pt`` of a run folder.

    Raises:
        FileNotFoundError: the run never finished an epoch (says how to continue it).
    """
    best = Path(work_dir) / "checkpoints" / "best.pt"
    if not best.is_file():
        raise FileNotFoundError(
            f"{work_dir} has no checkpoints/best.pt (the run never finished an epoch); finish "
            f"training first, e.g. continue it with: python run.py resume=true work_dir={work_dir}"
        )
    return best
