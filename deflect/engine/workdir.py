"""Run folders: ``<work_root>/<time>_<encoder>_<finetune>_<dataset>/``, decided by rank 0 only.

Also rebuilds a finished run's config for evaluation, with command-line key overrides on top.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIG_GROUPS = (
    "encoder", "dataset", "segmentor", "augmentation", "finetune", "optimizer", "scheduler",
)  # fmt: skip


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


def _claim(work_dir: Path, resume: bool, fix: str) -> str:
    """Create the named run folder; one that already holds a run is refused unless resuming."""
    if (work_dir / "checkpoints" / "last.pt").is_file() and not resume:
        raise FileExistsError(f"{work_dir} already holds a run; {fix} (nothing was overwritten)")
    work_dir.mkdir(parents=True, exist_ok=True)
    return str(work_dir)


def choose_work_dir(cfg: DictConfig, choices: dict, job: SweepJob | None = None) -> str:
    """The run folder: in a multirun, the job's folder in the sweep folder; else ``work_dir`` if
    given, the newest matching run on ``resume=true``, or a new timestamped folder. Called on
    rank 0 only; the result is broadcast."""
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
        return _claim(Path(cfg.work_dir).expanduser(), bool(cfg.resume),
                      "pass resume=true to continue it, or choose another work_dir")  # fmt: skip
    root = Path(cfg.work_root).expanduser()
    if cfg.resume:
        runs = sorted(
            p.parent.parent for p in root.glob(f"*_{suffix}/checkpoints/last.pt") if p.is_file()
        )
        if runs:
            return str(runs[-1])
        log.warning(
            "resume=true but no run *_%s in %s has a last checkpoint: starting anew", suffix, root
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work_dir = root / f"{stamp}_{suffix}"
    n = 1
    while work_dir.exists():
        work_dir = root / f"{stamp}-{n}_{suffix}"
        n += 1
    work_dir.mkdir(parents=True)
    return str(work_dir)


def eval_config(work_dir: Path, overrides: list[str]) -> DictConfig:
    """The config a run was trained with, updated by command-line key overrides.

    ``dataset.root=...`` or ``batch_size=...`` apply; selecting another config group
    (``dataset=other``) would evaluate a different experiment and is refused.
    """
    path = work_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"eval_dir {work_dir} is not a run folder (no config.yaml); point eval_dir at a "
            "folder written by a training run, e.g. work_dirs/<time>_<encoder>_<finetune>_<dataset>"
        )
    saved = OmegaConf.load(path)
    keep = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key == "eval_dir":
            continue
        if key.startswith(("+", "~")) or key in CONFIG_GROUPS:
            raise ValueError(
                f"eval_dir: the override {item!r} changes the experiment; only key overrides "
                "such as dataset.root=... or batch_size=... apply to a saved run"
            )
        keep.append(item)
    merged = OmegaConf.merge(saved, OmegaConf.from_dotlist(keep))
    merged.eval_dir = str(work_dir)
    return merged


# Keys that may change between a run and its resumption without changing the experiment.
RESUME_FREE_KEYS = {
    "resume", "work_dir", "work_root", "stop_after_epochs", "num_workers", "eval_dir",
    "log_interval", "device",
}  # fmt: skip


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def resume_config_changes(saved: DictConfig, current: DictConfig) -> list[str]:
    """``key: saved -> current`` for every setting a resumed run changes (free keys aside)."""
    old = _flatten(OmegaConf.to_container(saved, resolve=True))
    new = _flatten(OmegaConf.to_container(current, resolve=True))
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in RESUME_FREE_KEYS or old.get(key) == new.get(key):
            continue
        changes.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return changes


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
