"""The submitting side of a SLURM sweep: the launcher hook, the checks before ``sbatch``, the
list of the sweep's jobs (``slurm_jobs.json``) and the wait for them through ``squeue``."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deflect.launch.job import LAUNCHERS, POLL_S, SWEEP_JOBS

log = logging.getLogger(__name__)


class SlurmSubmissionError(RuntimeError):
    """``sbatch`` refused the sweep (SLURM's message, then the fix)."""


def _launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
    """``SlurmLauncher.launch`` once :func:`wire_launcher` ran: the framework's submission."""
    return submit_sweep(launcher, job_overrides, initial_job_idx)


def wire_launcher() -> None:
    """Make hydra-submitit-launcher's ``SlurmLauncher`` submit through :func:`submit_sweep`
    (its jobs listed in ``slurm_jobs.json``, awaited through ``squeue``, errors with their fix).

    Hydra instantiates launchers only from its ``hydra_plugins`` package, and the project keeps
    no folder of that name: the plugin's own class stays the ``_target_``, and only its
    ``launch`` (which runs in the submitting process, never in a job) is replaced. A no-op when
    the ``slurm`` extra is not installed."""
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return
    from hydra.core.plugins import Plugins

    # Hydra's plugin scan executes each plugin module anew (a new module object, new classes):
    # scan first, then change the class that Hydra will instantiate.
    Plugins.instance()
    sys.modules[
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher"
    ].SlurmLauncher.launch = _launch


def check_launcher(argv: Sequence[str]) -> None:
    """Before Hydra starts: a ``hydra/launcher=submitit_*`` choice needs the ``slurm`` extra
    and, for SLURM, ``sbatch`` on the PATH.

    Raises:
        SystemExit: with the cause and the fix.
    """
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra/launcher=")]
    if not chosen or chosen[-1] not in LAUNCHERS:
        return
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
        import submitit  # noqa: F401
    except ImportError as err:
        raise SystemExit(
            f"hydra/launcher={chosen[-1]} needs the slurm extra (hydra-submitit-launcher and "
            f"submitit), which is not installed ({err}). Install it with: pip install -e "
            "'.[slurm]' (make setup does), or leave hydra/launcher out to run the sweep here, "
            "one job after another"
        ) from None
    if chosen[-1] == "submitit_slurm" and shutil.which("sbatch") is None:
        raise SystemExit(
            "hydra/launcher=submitit_slurm submits with sbatch, which is not on the PATH: run "
            "it on the cluster's login node (or load its slurm module). To try it on this "
            "machine, start a one-node SLURM with: sudo scripts/slurm_local.sh start (needs "
            "apt-get install slurm-wlm munge); hydra/launcher=submitit_local runs the sweep "
            "through submitit without SLURM"
        )


def explain_submission_error(message: str, params: dict[str, Any], n_jobs: int) -> str:
    """SLURM's refusal of a submission, with the fix for the refusals users meet."""
    text = message.strip()
    low = text.lower()
    if "partition" in low:
        fix = (
            f"hydra.launcher.partition={params.get('slurm_partition')!r} is not a partition of "
            "this cluster (or not one you may use): `sinfo -s` lists them; set "
            "hydra.launcher.partition=<one of them> (null: the cluster's default)"
        )
    elif "array" in low or "maxarraysize" in low:
        fix = (
            f"the sweep has {n_jobs} jobs, more than the cluster's job array may hold "
            "(`scontrol show config | grep MaxArraySize`). Split the sweep into several "
            "launches of fewer values each; hydra.launcher.array_parallelism only limits how "
            "many run at once"
        )
    elif "time limit" in low:
        fix = "hydra.launcher.timeout_min is above the partition's limit (`sinfo -s`)"
    elif "account" in low or "qos" in low:
        fix = "check hydra.launcher.account / hydra.launcher.qos against `sacctmgr show assoc`"
    else:
        fix = "see `man sbatch` for the option SLURM names"
    return f"sbatch refused the sweep: {text}\n{fix}"


def max_array_size() -> int | None:
    """The cluster's ``MaxArraySize`` (array indices run from 0 to one below it); None when
    ``scontrol`` cannot say."""
    if shutil.which("scontrol") is None:
        return None
    proc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            return int(value.strip())
    return None


def check_array_size(n_jobs: int) -> None:
    """Refuse, before anything is pickled or submitted, a sweep that sbatch would refuse as too
    large a job array.

    Raises:
        SlurmSubmissionError: naming the limit and how to split the sweep.
    """
    limit = max_array_size()
    if limit is not None and n_jobs > limit:
        raise SlurmSubmissionError(
            f"the sweep has {n_jobs} jobs, more than this cluster's job arrays may hold "
            f"(MaxArraySize={limit}), so sbatch would refuse it; nothing was submitted. Split "
            f"the sweep into launches of at most {limit} jobs (fewer values per launch, each "
            "with its own hydra.sweep.dir); hydra.launcher.array_parallelism only limits how "
            "many run at once"
        )


#: Job states after which a job never runs again (a requeued job is PENDING again instead).
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
    "DEADLINE",
})  # fmt: skip


def queue_states(array_ids: Sequence[str]) -> dict[str, str] | None:
    """``{job id: state}`` of the given jobs (array tasks one by one) still known to
    ``squeue``; jobs SLURM has forgotten are absent. None when squeue could not answer (not
    installed, the controller busy or down): then nothing can be said about the queue."""
    if not array_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    proc = subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(sorted(set(array_ids)))],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        # Every job named has left the controller's memory: none is queued. Anything else
        # (a timeout, the controller down) says nothing.
        return {} if "invalid job id" in proc.stderr.lower() else None
    states = {}
    for line in proc.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        if jid:
            states[jid] = state
    return states


def job_logs(submitit_folder: str, jid: str, task: int = 0) -> dict[str, str]:
    """The SLURM log files of task ``task`` of job ``jid`` under submitit's folder."""
    folder = Path(submitit_folder.replace("%j", jid)).absolute()
    return {kind: str(folder / f"{jid}_{task}_log.{kind}") for kind in ("out", "err")}


def write_sweep_jobs(sweep_dir: Path, jobs: list[dict]) -> None:
    """``<sweep>/slurm_jobs.json``: the jobs of this launch added to those of earlier ones."""
    from deflect.io import atomic_path

    path = sweep_dir / SWEEP_JOBS
    try:
        known = json.loads(path.read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        known = []
    nums = {job["num"] for job in jobs}
    merged = sorted([j for j in known if j["num"] not in nums] + jobs, key=lambda j: j["num"])
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"jobs": merged}, indent=2))


def wait_for(jobs: list, records: list[dict]) -> list:
    """Wait until every job has a result or has left the queue; each job's ``JobReturn``.

    A job that left the queue without a result died outside Python (killed, out of memory, a
    broken environment): it is returned as failed, naming its SLURM log.
    """
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import pickle_load

    results: dict[int, Any] = {}
    gone_since: dict[int, float] = {}
    while len(results) < len(jobs):
        arrays = {str(job.job_id).split("_")[0] for job in jobs}
        states = queue_states(list(arrays))
        for i, (job, rec) in enumerate(zip(jobs, records)):
            if i in results:
                continue
            if job.paths.result_pickle.exists():
                outcome, value = pickle_load(job.paths.result_pickle)
                if outcome == "success" and value.status == JobStatus.FAILED:
                    error = value._return_value  # raised by the sweeper; name the log too
                    results[i] = _failed(JobReturn, JobStatus, rec, one_line(error))
                elif outcome == "success":
                    results[i] = value
                else:
                    results[i] = _failed(JobReturn, JobStatus, rec, value.strip().splitlines()[-1])
            elif states is not None and states.get(rec["job_id"], "COMPLETED") in FINAL_STATES:
                # Gone from the queue: give the result file a moment to appear (network file
                # systems), then call it dead.
                gone_since.setdefault(i, time.time())
                if time.time() - gone_since[i] > 2 * POLL_S:
                    results[i] = _failed(JobReturn, JobStatus, rec, None)
        if len(results) < len(jobs):
            time.sleep(POLL_S)
    return [results[i] for i in range(len(jobs))]


def one_line(error: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line (Hydra's instantiation errors put the cause on the next)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failed(job_return: type, job_status: Any, rec: dict, error: str | None) -> Any:
    """A failed job's ``JobReturn``: its error names the job, its SLURM id and its log."""
    where = f"job {rec['num']} ({' '.join(rec['overrides'])}), SLURM job {rec['job_id']}"
    if error is None:
        message = (
            f"{where} ended without a result: it died before Python started or was killed "
            f"(out of memory, time limit, scancel, a broken environment). Its SLURM log: "
            f"{rec['log_err']} (and {rec['log_out']})"
        )
    else:
        message = f"{where} failed: {error}. Its SLURM log: {rec['log_err']}"
    ret = job_return()
    ret.status = job_status.FAILED
    ret.return_value = RuntimeError(message)
    ret.overrides = rec["overrides"]
    return ret


def submit_sweep(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """The submitit SLURM launcher's ``launch``: submit the jobs as one array, list them in
    ``slurm_jobs.json``, wait for them through ``squeue``, and return their ``JobReturn``s."""
    import submitit
    from hydra.core.singleton import Singleton
    from hydra.core.utils import filter_overrides
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    if not logging.getLogger().handlers:  # Hydra's logging is off (run.py sets up its own)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S", level=logging.INFO, stream=sys.stdout)  # fmt: skip
    check_array_size(len(job_overrides))
    params = dict(launcher.params)
    folder = params.pop("submitit_folder")
    init = {"folder": folder}
    if "max_num_timeout" in params:
        init["slurm_max_num_timeout"] = params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params = {k if k in base else f"slurm_{k}": v for k, v in params.items()}
    executor.update_parameters(**params)

    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    args = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}",
                     Singleton.get_state()))  # fmt: skip
    started = time.time()
    try:
        jobs = executor.map_array(launcher, *zip(*args))
    except submitit.core.utils.FailedJobError as err:
        raise SlurmSubmissionError(explain_submission_error(str(err), params, len(args))) from None
    records = [
        {"num": idx, "overrides": list(overrides), "job_id": str(job.job_id),
         **{f"log_{k}": v for k, v in job_logs(folder, str(job.job_id)).items()}}
        for (overrides, _, idx, *_), job in zip(args, jobs)
    ]  # fmt: skip
    write_sweep_jobs(sweep_dir, records)
    log.info(
        "submitted %d job(s) as SLURM job array %s in %.1f s; where they stand: python "
        "scripts/sweep_status.py %s", len(jobs), str(jobs[0].job_id).split("_")[0],
        time.time() - started, sweep_dir,
    )  # fmt: skip
    return wait_for(jobs, records)
