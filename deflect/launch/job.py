"""Inside a SLURM (or submitit) job: its id, its ranks' environment, and the record of its
starts in ``<run>/slurm.json`` by which a requeued job continues its own run. Also the files
both sides share."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from deflect.io import atomic_path

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

#: Written by the submitting command in the sweep folder: every job and its SLURM id.
SWEEP_JOBS = "slurm_jobs.json"
#: Written by a job in its run folder: its SLURM job id(s) and every start (requeues included).
RUN_RECORD = "slurm.json"
#: The launcher configs that need the ``slurm`` extra.
LAUNCHERS = ("submitit_slurm", "submitit_local")
#: Seconds between two looks at the queue while the submitting command waits.
POLL_S = 1.0


def job_id() -> str | None:
    """This process's SLURM job id (``<array id>_<index>`` in a job array); None outside SLURM."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"{array}_{index}"
    return os.environ.get("SLURM_JOB_ID")


def export_rank_environment() -> None:
    """In a submitit job of several tasks (SLURM's, or submitit_local's processes), give this
    task the variables torchrun would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``), so that
    :func:`~deflect.engine.distributed.init_distributed` starts the same process group as under
    torchrun. Left alone when torchrun (or the user) set them, or in a one-task job."""
    if os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local") or "RANK" in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks <= 1:
        return
    # The rendezvous is the first node of the job, on a port drawn from the job id (the same on
    # every task). GPUs are left as SLURM gave them: each rank picks its own by local rank.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def submitit_log(kind: str = "out") -> Path | None:
    """This task's submitit log (``<submitit folder>/<job id>_<task>_log.<kind>``), if any."""
    folder = os.environ.get("SUBMITIT_FOLDER")
    jid = job_id()
    if not folder or not jid:
        return None
    task = os.environ.get("SLURM_PROCID", "0")
    return Path(folder.replace("%j", jid)) / f"{jid}_{task}_log.{kind}"


def read_record(folder: Path) -> dict:
    """A run folder's ``slurm.json`` (empty when it has none)."""
    try:
        return json.loads((Path(folder) / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return {}


def requeued_into(folder: Path) -> bool:
    """Whether this process is a requeued start of the SLURM job that began ``folder``: the
    folder's ``slurm.json`` already lists this job id, so the job continues it."""
    jid = job_id()
    return bool(jid) and jid in read_record(folder).get("job_ids", [])


def record_start(folder: Path) -> dict | None:
    """Add this start to ``<folder>/slurm.json`` (rank 0 only): the job id, SLURM's restart count,
    the host, the time and the log. Returns the start's record; None outside SLURM."""
    jid = job_id()
    if not jid:
        return None
    record = read_record(folder)
    starts = record.get("starts", [])
    start = {
        "job_id": jid,
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tasks": int(os.environ.get("SLURM_NTASKS", "1")),
        "log": str(submitit_log() or ""),
    }
    starts.append(start)
    ids = record.get("job_ids", [])
    if jid not in ids:
        ids.append(jid)
    record = {"job_ids": ids, "requeues": len(starts) - 1, "starts": starts}
    with atomic_path(Path(folder) / RUN_RECORD) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    if len(starts) > 1:
        log.info("SLURM job %s started again (start %d, restart count %s): resuming",
                 jid, len(starts), start["restart_count"])  # fmt: skip
    return start
