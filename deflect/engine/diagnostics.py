"""Which checkpoint a run's diagnostics (``<run>/diagnostics/explain.json``, written by
``scripts/explain.py``) were computed from, and whether they still describe the run.

The occlusion importances and deflection statistics belong to one ``checkpoints/best.pt``. A run
that goes on after they were computed (a resumed run whose later epoch is better) rewrites
``best.pt``, and the diagnostics then describe weights the run no longer has: they are *stale*.
``explain.json`` records the checkpoint's size, modification time, SHA-256 and epoch, so readers
(the ablation table) can tell. Light on purpose (no torch): the ablation table imports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: Where a run's diagnostics go, and the file that records what they came from.
DIAGNOSTICS = "diagnostics"
EXPLAIN_JSON = "explain.json"
BEST = Path("checkpoints") / "best.pt"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_record(run_dir: Path, epoch: int, epochs: int | None, finished: bool) -> dict:
    """What identifies the run's ``best.pt`` now: path (in the run), size, modification time
    (ns), SHA-256, its epoch (1-based) of ``epochs``, and whether the run had finished."""
    path = Path(run_dir) / BEST
    stat = path.stat()
    return {
        "path": str(BEST),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256(path),
        "epoch": int(epoch),
        "epochs": epochs,
        "run_finished": bool(finished),
    }


def describe(record: dict) -> str:
    """``checkpoints/best.pt of epoch 3 of 15 (sha256 1a2b3c4d5e6f)``."""
    of = f" of {record['epochs']}" if record.get("epochs") else ""
    return f"{record['path']} of epoch {record['epoch']}{of} (sha256 {record['sha256'][:12]})"


def staleness(run_dir: Path) -> str | None:
    """Why ``<run>/diagnostics/explain.json`` does not describe the run's current ``best.pt``,
    or ``None`` when it does (or when there are no diagnostics).

    Size and modification time equal to the recorded ones mean the same file; otherwise the
    SHA-256 decides (a copy of the run keeps its checkpoint's content, not always its time)."""
    run_dir = Path(run_dir)
    path = run_dir / DIAGNOSTICS / EXPLAIN_JSON
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return f"{path} cannot be read"
    if not isinstance(record, dict) or "sha256" not in record:
        return "it does not record which checkpoint it explained (written by an older explain.py)"
    best = run_dir / BEST
    if not best.is_file():
        return f"the run has no {BEST} any more"
    stat = best.stat()
    if stat.st_size == record.get("size") and stat.st_mtime_ns == record.get("mtime_ns"):
        return None
    if sha256(best) == record["sha256"]:
        return None
    return f"{BEST} changed after it was explained (the diagnostics are of {describe(record)})"
