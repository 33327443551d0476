"""Sweeps and DDP jobs on a real SLURM (Debian's slurm-wlm, one node: this machine), started by
the session fixture through ``scripts/slurm_local.sh``: each job's metrics equal the basic
launcher's, torchrun's, or an uninterrupted run's; failures are named with their SLURM log."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, load_script, run_cli

#: A tiny sweep job: no prediction GeoTIFFs (nothing here compares them).
JOB = [*TINY, "finetune=frozen", "save_predictions=false"]
SLURM = ["-m", "hydra/launcher=submitit_slurm"]
HOW = (
    "no SLURM on this machine: install it (as root: apt-get install -y slurm-wlm munge) and "
    "the slurm extra (pip install -e '.[slurm]'); the tests then start a one-node cluster with "
    "scripts/slurm_local.sh start (.ci/run does all of it)"
)


def job_env() -> dict[str, str]:
    """The submitting environment, which sbatch passes on to the jobs: this checkout first."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM; stopped at the end if this session started it."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip(HOW)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=HOW)
    script = str(REPO / "scripts" / "slurm_local.sh")
    running = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    started_here = "UP" not in running.stdout
    start = subprocess.run(["bash", script, "start"], capture_output=True, text=True)
    assert start.returncode == 0, start.stdout + start.stderr
    yield start.stdout.strip()
    if started_here:
        subprocess.run(["bash", script, "stop"], capture_output=True, text=True)


def submit(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python run.py -m hydra/launcher=submitit_slurm ...`` in the background."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::UserWarning",
           **job_env()}  # fmt: skip
    return subprocess.Popen([sys.executable, str(REPO / "run.py"), *SLURM, *args], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the submitting command did not end:\n{out[-4000:]}") from None
    return out


def only_sweep(cwd: Path) -> Path:
    sweeps = list((cwd / "work_dirs" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"{path} never appeared:\n{finish(proc)[-4000:]}")
        time.sleep(0.2)


def metrics(folder: Path) -> dict:
    """What must not change between launchers: the test metrics (confusion matrix included) and
    the best validation epoch's."""
    summary = json.loads((folder / "metrics.json").read_text())
    return {
        "test": json.loads((folder / "test_metrics.json").read_text()),
        "best_val": summary["best_val"],
        "train_images": summary["train_images"],
    }


def test_a_sweep_is_one_job_array_listed_before_it_runs_and_a_failed_job_names_its_log(
    slurm_cluster, demo_root, tmp_path
):
    """Two jobs, one with a bad dataset path, submitted held: both are listed as pending with
    their array ids before anything runs; once released, the good one finishes with the basic
    launcher's metrics and the bad one is failed, with its error and its SLURM log."""
    status = load_script("sweep_status")
    bad = tmp_path / "not_a_dataset"
    bad.mkdir()
    (bad / "notes.txt").write_text("not the demo")
    cwd = tmp_path / "slurm"
    cwd.mkdir()
    proc = submit([*JOB, f"dataset.root={demo_root},{bad}",
                   "+hydra.launcher.additional_parameters.hold=true"], cwd)  # fmt: skip
    wait_for_file(cwd / "work_dirs" / "multirun", proc)
    sweep = only_sweep(cwd)
    wait_for_file(sweep / "slurm_jobs.json", proc)
    held = status.sweep_status(sweep)
    array = held[0]["job_id"].split("_")[0]
    assert [(s["num"], s["state"], s["job_id"]) for s in held] == [
        (0, "pending", f"{array}_0"),
        (1, "pending", f"{array}_1"),
    ]
    subprocess.run(["scontrol", "release", array], check=True)
    out = finish(proc)
    assert proc.returncode == 1, out[-3000:]
    log_err = sweep / ".submitit" / f"{array}_1" / f"{array}_1_0_log.err"
    assert f"SLURM job {array}_1 failed: " in out and f"Its SLURM log: {log_err}" in out

    done = status.sweep_status(sweep)
    assert [(s["num"], s["state"]) for s in done] == [(0, "finished"), (1, "failed")]
    assert done[1]["log"] == str(log_err) and log_err.is_file()
    assert "is not a complete demo cache" in done[1]["error"], done[1]["error"]
    assert f"     SLURM log: {log_err}" in status.render(done)
    record = json.loads((sweep / "000_tiny_vit_frozen_demo" / "slurm.json").read_text())
    assert record["job_ids"] == [f"{array}_0"] and record["requeues"] == 0

    basic = tmp_path / "basic"
    basic.mkdir()
    run_cli(["-m", *JOB, f"dataset.root={demo_root}"], basic)
    assert metrics(sweep / "000_tiny_vit_frozen_demo") == metrics(
        only_sweep(basic) / "000_tiny_vit_frozen_demo"
    )


def test_a_partition_that_does_not_exist_is_refused_with_slurms_message(slurm_cluster, tmp_path):
    proc = submit([*JOB, "hydra.launcher.partition=nosuch"], tmp_path)
    out = finish(proc, timeout=120)
    assert proc.returncode == 1
    assert "sbatch refused the sweep: sbatch: error: invalid partition specified: nosuch" in out
    assert "`sinfo -s` lists them; set hydra.launcher.partition=" in out


def test_a_job_that_dies_before_python_starts_is_failed_with_its_log(slurm_cluster, tmp_path):
    """The job's shell exits in its setup lines: no Python, no run folder, no result; the
    submitting command still ends, naming the job's SLURM log (no sacct here)."""
    status = load_script("sweep_status")
    proc = submit([*JOB, "hydra.launcher.setup=[exit 3]"], tmp_path)
    out = finish(proc, timeout=120)
    assert proc.returncode == 1, out[-3000:]
    sweep = only_sweep(tmp_path)
    (job,) = status.sweep_status(sweep)
    assert job["state"] == "failed" and job["folder"] is None
    assert job["error"].startswith("ended without a result")
    assert "ended without a result: it died before Python started or was killed" in out
    assert f"Its SLURM log: {job['log']}" in out


def test_launcher_errors_say_the_fix(monkeypatch):
    """Without the slurm extra, or without sbatch: stopped before Hydra starts, with the fix."""
    from deflect.launch import submit as slurm

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(SystemExit, match=r"needs the slurm extra .* pip install -e '\.\[slurm\]'"):
        slurm.check_launcher(["-m", "hydra/launcher=submitit_slurm"])
    monkeypatch.delitem(sys.modules, "submitit")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason=HOW)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit, match=r"submits with sbatch, which is not on the PATH.*"
                                         r"scripts/slurm_local.sh start"):  # fmt: skip
        slurm.check_launcher(["hydra/launcher=submitit_slurm", "finetune=frozen"])
    slurm.check_launcher(["hydra/launcher=basic"])  # other launchers: nothing to check


@pytest.mark.slow
def test_a_four_job_sweep_on_slurm_equals_the_basic_launcher(slurm_cluster, demo_root, tmp_path):
    """finetune=frozen,deflect x seed=0,1 as one job array: every job's metrics equal the basic
    launcher's. Prints the submission, queue and total times of both."""
    sweep_args = [*TINY, f"dataset.root={demo_root}", "save_predictions=false",
                  "finetune=frozen,deflect", "seed=0,1"]  # fmt: skip
    cwd = tmp_path / "slurm"
    cwd.mkdir()
    started = time.time()
    proc = submit(sweep_args, cwd)
    out = finish(proc, timeout=600)
    slurm_s = time.time() - started
    assert proc.returncode == 0, out[-4000:]
    basic = tmp_path / "basic"
    basic.mkdir()
    started = time.time()
    run_cli(["-m", *sweep_args], basic)
    basic_s = time.time() - started

    sweep, reference = only_sweep(cwd), only_sweep(basic)
    jobs = json.loads((sweep / "slurm_jobs.json").read_text())["jobs"]
    array = jobs[0]["job_id"].split("_")[0]
    assert [j["job_id"] for j in jobs] == [f"{array}_{i}" for i in range(4)]
    names = sorted(p.name for p in reference.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert names == ["000_tiny_vit_frozen_demo", "001_tiny_vit_frozen_demo",
                     "002_tiny_vit_deflect_demo", "003_tiny_vit_deflect_demo"]  # fmt: skip
    for name in names:
        assert metrics(sweep / name) == metrics(reference / name), name
    submit_s = re.search(r"submitted 4 job\(s\) as SLURM job array \d+ in ([\d.]+) s", out)
    times = slurm_times(array)
    queued = [t["StartTime"] - t["SubmitTime"] for t in times]
    ran = [t["EndTime"] - t["StartTime"] for t in times]
    print(
        f"\n4-job sweep, 2 CPUs: SLURM {slurm_s:.1f} s in all (sbatch {submit_s[1]} s; "
        f"queued {min(queued):.0f}-{max(queued):.0f} s; jobs ran {min(ran):.0f}-{max(ran):.0f} "
        f"s each, 2 at a time); basic launcher {basic_s:.1f} s (one after another)"
    )


def epoch_lines(log: Path) -> dict[int, str]:
    """Each epoch's training loss and validation metrics as ``train.log`` has them (the last
    time the epoch was trained)."""
    found = re.findall(r"epoch (\d+)/\d+  (train loss .*)", log.read_text())
    return {int(epoch): text for epoch, text in found}


def slurm_times(array: str) -> list[dict[str, float]]:
    """SubmitTime, StartTime and EndTime (epoch seconds) of each task of a job array, from
    ``scontrol`` (SLURM keeps finished jobs for MinJobAge, 300 s here; there is no sacct)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    times = []
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        times.append({k: time.mktime(time.strptime(fields[k], "%Y-%m-%dT%H:%M:%S"))
                      for k in ("SubmitTime", "StartTime", "EndTime")})  # fmt: skip
    return times


@pytest.mark.slow
def test_two_slurm_tasks_are_two_ddp_ranks_equal_to_torchrun(slurm_cluster, demo_root, tmp_path):
    """tasks_per_node=2: each SLURM task is one rank of a gloo process group, and the run
    equals torchrun --nproc_per_node=2 on the same settings."""
    args = [*JOB, f"dataset.root={demo_root}", "batch_size=2", "epochs=1"]
    cwd = tmp_path / "slurm"
    cwd.mkdir()
    proc = submit([*args, "hydra.launcher.tasks_per_node=2"], cwd)
    out = finish(proc, timeout=600)
    assert proc.returncode == 0, out[-4000:]
    folder = only_sweep(cwd) / "000_tiny_vit_frozen_demo"
    record = json.loads((folder / "slurm.json").read_text())
    assert record["starts"][0]["tasks"] == 2
    ddp = metrics(folder)
    assert ddp["train_images"] == 3 * 2 * 2  # 3 steps x 2 images x 2 ranks
    assert ddp["test"]["pixels"] == 64 * 300  # each test pixel once, over both ranks
    run_cli([*args, f"work_dir={tmp_path / 'torchrun'}"], tmp_path, nproc=2, env=job_env())
    assert ddp == metrics(tmp_path / "torchrun")


@pytest.mark.slow
def test_a_job_sent_the_time_limit_warning_resumes_to_the_uninterrupted_metrics(
    slurm_cluster, demo_root, tmp_path
):
    """SIGUSR2 (SLURM's warning before the time limit) in the second epoch: the job requeues
    itself, its next start resumes from last.pt in the same folder, and the run ends with the
    metrics of an uninterrupted run; slurm.json lists both starts."""
    args = [*JOB, f"dataset.root={demo_root}", "epochs=4"]
    cwd = tmp_path / "slurm"
    cwd.mkdir()
    proc = submit(args, cwd)
    wait_for_file(cwd / "work_dirs" / "multirun", proc)
    sweep = only_sweep(cwd)
    wait_for_file(sweep / "slurm_jobs.json", proc)
    (job,) = json.loads((sweep / "slurm_jobs.json").read_text())["jobs"]
    log = sweep / "000_tiny_vit_frozen_demo" / "train.log"
    deadline = time.time() + 240
    while not (log.is_file() and "epoch 1/4" in log.read_text()):
        assert time.time() < deadline and proc.poll() is None, "the job never trained an epoch"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job["job_id"]], check=True)
    # SLURM holds a requeued batch job back for about two minutes; start it now.
    deadline = time.time() + 60
    while True:
        state = subprocess.run(["squeue", "-h", "-o", "%T %r", "-j", job["job_id"]],
                               capture_output=True, text=True).stdout  # fmt: skip
        if "PENDING" in state:
            subprocess.run(["scontrol", "update", f"JobId={job['job_id']}", "StartTime=now"],
                           check=True)  # fmt: skip
            break
        assert time.time() < deadline, f"the job was not requeued: {state}"
        time.sleep(0.2)
    out = finish(proc, timeout=600)
    assert proc.returncode == 0, out[-4000:]
    folder = sweep / "000_tiny_vit_frozen_demo"
    record = json.loads((folder / "slurm.json").read_text())
    assert record["job_ids"] == [job["job_id"]] and record["requeues"] == 1
    assert [s["restart_count"] for s in record["starts"]] == [0, 1]
    assert "resumed from" in log.read_text()

    run_cli([*args, f"work_dir={tmp_path / 'uninterrupted'}"], tmp_path)
    resumed, uninterrupted = metrics(folder), metrics(tmp_path / "uninterrupted")
    epochs = epoch_lines(log), epoch_lines(tmp_path / "uninterrupted" / "train.log")
    print(f"\nrequeued:      test mIoU {resumed['test']['mIoU']!r}, epochs {epochs[0]}"
          f"\nuninterrupted: test mIoU {uninterrupted['test']['mIoU']!r}, epochs {epochs[1]}")  # fmt: skip
    assert epochs[0] == epochs[1] and sorted(epochs[0]) == [1, 2, 3, 4]
    assert resumed == uninterrupted


def test_a_sweep_larger_than_the_clusters_job_arrays_is_refused_before_submission(slurm_cluster):
    """The limit is the running cluster's MaxArraySize (1001, SLURM's default). Checked on the
    launcher's function: a 1002-job sweep through run.py spends minutes composing each job's
    config in Hydra's sweeper before the launcher sees it."""
    from deflect.launch import submit as slurm

    assert slurm.max_array_size() == 1001
    slurm.check_array_size(1001)
    with pytest.raises(slurm.SlurmSubmissionError, match=r"^the sweep has 1002 jobs, more than "
                       r"this cluster's job arrays may hold \(MaxArraySize=1001\), so sbatch "
                       r"would refuse it; nothing was submitted. Split"):  # fmt: skip
        slurm.check_array_size(1002)
