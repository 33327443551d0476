"""Where each job of a sweep stands: finished, running, pending or failed.

    python scripts/sweep_status.py work_dirs/multirun/<time>          # a table
    python scripts/sweep_status.py work_dirs/multirun/<time> --json   # the same, as JSON

Works while the sweep runs, before any job has finished. For a sweep sent to SLURM
(``hydra/launcher=submitit_slurm``) the jobs and their SLURM ids come from ``slurm_jobs.json``,
written when ``sbatch`` accepted the array; pending and running come from ``squeue``; finished and
failed from the run folders (``metrics.json``, ``failed.txt``) and submitit's result files, so no
accounting (``sacct``) is needed. A failed job names its error and its SLURM log; a job that left
the queue without a result (killed, out of memory, died before Python started) is failed too.
For a sweep run by the basic launcher the run folders alone say it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deflect.launch.job import SWEEP_JOBS, read_record
from deflect.launch.submit import queue_states

RUNNING = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}


def run_folder(sweep: Path, num: int) -> Path | None:
    """The run folder of job ``num`` (``<NNN>_<encoder>_<finetune>_<dataset>``), once it exists."""
    found = sorted(p for p in sweep.glob(f"{num:03d}_*") if p.is_dir())
    return found[0] if found else None


def first_line(path: Path) -> str:
    """A failed run's error: the first paragraph of ``failed.txt``, on one line."""
    try:
        return " ".join(path.read_text().split("\n\n")[0].split())
    except OSError:
        return ""


def job_status(sweep: Path, job: dict, queue: dict[str, str]) -> dict:
    """One job's state, SLURM id, run folder and, when failed, its error and SLURM log."""
    folder = run_folder(sweep, job["num"])
    jid = job.get("job_id")
    status = {"num": job["num"], "overrides": job["overrides"], "job_id": jid,
              "folder": str(folder) if folder else None}  # fmt: skip
    if folder is not None:
        status["job_ids"] = read_record(folder).get("job_ids", [])
    if folder is not None and (folder / "metrics.json").is_file():
        return {**status, "state": "finished"}
    state = queue.get(jid) if jid else None
    if state is not None and state not in RUNNING and state != "PENDING":
        state = "PENDING" if state in {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"} else state
    if state in RUNNING or (state is None and jid is None and folder is not None
                            and not (folder / "failed.txt").is_file()):  # fmt: skip
        return {**status, "state": "running"}
    if state == "PENDING":
        return {**status, "state": "pending"}
    # Not in the queue (or in a final state) and not finished: failed.
    error = first_line(folder / "failed.txt") if folder is not None else ""
    if not error and jid is not None:
        result = Path(job["log_err"]).with_name(f"{jid}_0_result.pkl")
        error = (
            "ended without a result: killed, out of memory, or died before Python started"
            if not result.is_file()
            else "ended without metrics.json (see its log)"
        )
    elif not error:
        error = "never started" if folder is None else "stopped without metrics.json"
    return {**status, "state": "failed", "error": error, "log": job.get("log_err")}


def sweep_jobs(sweep: Path) -> list[dict]:
    """The sweep's jobs: from ``slurm_jobs.json``, else from its run folders."""
    try:
        return json.loads((sweep / SWEEP_JOBS).read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        pass
    jobs = []
    for folder in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[:3].isdigit()):
        try:
            record = json.loads((folder / "job.json").read_text())
        except (OSError, ValueError):
            record = {"num": int(folder.name[:3]), "overrides": []}
        jobs.append({"num": record["num"], "overrides": record["overrides"]})
    return jobs


def sweep_status(sweep: Path) -> list[dict]:
    """Every job of the sweep folder ``sweep`` with its state."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise FileNotFoundError(f"{sweep} is not a folder; pass a sweep folder such as "
                                "work_dirs/multirun/<time>")  # fmt: skip
    jobs = sweep_jobs(sweep)
    queue = queue_states([j["job_id"].split("_")[0] for j in jobs if j.get("job_id")])
    if queue is None:
        raise RuntimeError("squeue did not answer (is slurmctld up? `squeue` says why); the "
                           "state of jobs that have not finished is unknown")  # fmt: skip
    return [job_status(sweep, job, queue) for job in jobs]


def render(statuses: list[dict]) -> str:
    """A table: one line per job, the error and log of a failed one below it."""
    lines = [f"{'job':<4} {'state':<9} {'SLURM job':<12} overrides"]
    for s in statuses:
        ids = ",".join(s.get("job_ids") or ([s["job_id"]] if s.get("job_id") else [])) or "-"
        lines.append(f"{s['num']:<4} {s['state']:<9} {ids:<12} {' '.join(s['overrides'])}")
        if s["state"] == "failed":
            lines.append(f"     error: {s['error']}")
            if s.get("log"):
                lines.append(f"     SLURM log: {s['log']}")
    counts = {}
    for s in statuses:
        counts[s["state"]] = counts.get(s["state"], 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the sweep's status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder, work_dirs/multirun/<time>")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    statuses = sweep_status(args.sweep)
    print(json.dumps(statuses, indent=2) if args.json else render(statuses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
