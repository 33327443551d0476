"""The run folder is claimed by one process, left untouched once finished, kept clean of what
interrupted writes leave, and never created for a command line that cannot run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from deflect.engine.workdir import RunFolderBusy, RunLock, check_run_config, eval_config
from tests.conftest import REPO, TINY, run_cli


def test_a_run_folder_is_claimed_by_one_process_and_freed_when_it_dies(tmp_path):
    """Another process holding the folder (here a plain Python process, killed with SIGKILL
    afterwards) makes a run refuse it with the holder's pid; once the holder is dead, the lock
    it never released is free again."""
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; sys.path.insert(0, sys.argv[1]);"
         "from deflect.engine.workdir import RunLock; lock = RunLock(sys.argv[2]).acquire();"
         "print('held', flush=True); time.sleep(60)", str(REPO), str(folder)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"in use by another run: pid {holder.pid} on "):
            RunLock(folder).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(folder).acquire().release()  # a crashed holder leaves nothing stuck


def test_two_runs_with_one_work_dir_the_second_refuses(demo_root, tmp_path):
    folder = tmp_path / "shared"
    lock = RunLock(folder).acquire()  # the first run, still training
    try:
        proc = run_cli([*TINY, f"dataset.root={demo_root}", f"work_dir={folder}"], tmp_path,
                       check=False)  # fmt: skip
    finally:
        lock.release()
    assert proc.returncode != 0
    assert f"in use by another run: pid {os.getpid()}" in proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written


def test_bad_settings_fail_before_a_folder_or_torch_exists(tmp_path):
    """Each bad value is named with what it must be; no run folder appears; a key no part
    reads is warned about."""
    cases = {
        "epochs=abc": "epochs='abc': expected an integer >= 1",
        "img_size=0": "img_size=0: expected an integer >= 1",
        "eval_batch_size=0": "eval_batch_size=0: expected an integer >= 1",
        "num_workers=-1": "num_workers=-1: expected an integer >= 0",
        "optimizer.lr=-0.001": "optimizer.lr=-0.001: expected a number > 0",
        "max_steps_per_epoch=0": "max_steps_per_epoch=0: expected an integer >= 1",
    }
    proc = run_cli([*cases, "work_root=runs"], tmp_path, check=False)
    assert proc.returncode != 0
    for message in cases.values():
        assert message in proc.stderr, message
    assert not (tmp_path / "runs").exists()
    proc = run_cli(["+typo_key=3", f"eval_dir={tmp_path / 'none'}"], tmp_path, check=False)
    assert "['typo_key'] are read by no part" in proc.stdout + proc.stderr


def test_check_run_config_takes_good_values_and_nulls():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"epochs": 3, "max_steps_per_epoch": None, "precision": "bf16",
                            "optimizer": {"lr": 1e-3}, "compile": False, "extra": 1})  # fmt: skip
    assert check_run_config(cfg) == ["extra"]
    for bad in ({"compile": "yes"}, {"precision": "fp8"}, {"grad_clip": -1.0}, {"epochs": None}):
        with pytest.raises(ValueError, match=str(next(iter(bad)))):
            check_run_config(OmegaConf.merge(cfg, bad))


def test_a_saved_config_may_not_instantiate_anything_outside_the_framework(tmp_path):
    """A run folder from elsewhere whose config.yaml names ``os.system``: refused before any
    instantiation, by eval_dir (a command line) and by predict.py's loader alike."""
    run = tmp_path / "foreign"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    marker = tmp_path / "pwned"
    (run / "config.yaml").write_text(
        "dataset:\n  _target_: os.system\n  command: touch " + str(marker) + "\n"
    )
    with pytest.raises(ValueError, match=r"dataset._target_='os.system'"):
        eval_config(run, [])
    proc = run_cli([f"eval_dir={run}"], tmp_path, check=False)
    assert proc.returncode != 0 and "refusing to instantiate it" in proc.stderr
    from deflect.predict import load_predictor

    with pytest.raises(ValueError, match="os.system"):
        load_predictor(run)
    # the same reached through a framework module's import, and a framework function
    for target, why in (("deflect.engine.workdir.os.system", "resolves to posix.system"),
                        ("datasets.demo.shutil.rmtree", "resolves to shutil.rmtree"),
                        ("deflect.engine.workdir.Path", r"resolves to pathlib.Path, outside"),
                        ("deflect.engine.workdir.eval_config", "which is not a class"),
                        ("deflect.NoSuchThing", "names nothing importable")):  # fmt: skip
        (run / "config.yaml").write_text(
            f"dataset:\n  _target_: {target}\n  command: touch {marker}\n"
        )
        with pytest.raises(ValueError, match=why):
            eval_config(run, [])
    assert not marker.exists()
    (run / "config.yaml").write_text("dataset:\n  _target_: datasets.GeoTIFFFolder\n"
                                     "optimizer:\n  _target_: torch.optim.AdamW\n")  # fmt: skip
    assert eval_config(run, []).optimizer._target_ == "torch.optim.AdamW"  # classes pass


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    """A real full disk: a 1 MiB tmpfs (skipped where mounting is not allowed)."""
    import torch

    from deflect.engine.checkpoint import atomic_save

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        atomic_save({"w": torch.ones(4)}, disk / "last.pt")
        with pytest.raises(OSError) as caught:
            atomic_save({"w": torch.ones(1_000_000)}, disk / "last.pt")
        first_line = str(caught.value).splitlines()[0]
        assert first_line.startswith("[Errno 28] No space left on device while writing")
        assert str(disk / "last.pt") in first_line and "previous last.pt is intact" in first_line
        assert torch.equal(torch.load(disk / "last.pt", weights_only=True)["w"], torch.ones(4))
        assert os.listdir(disk) == ["last.pt"]  # no temporary left
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_torch_s_full_disk_error_is_reported_as_one(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: torch.save failing as it does on a full disk (its
    ``enforce fail ... unexpected pos`` raised from ``ENOSPC``) gives the same first line, and
    the previous checkpoint and the folder stay as they were."""
    import errno

    import torch

    from deflect.engine import checkpoint

    atomic_save = checkpoint.atomic_save
    atomic_save({"w": torch.ones(4)}, tmp_path / "last.pt")

    def full_disk(obj, f):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"
            ) from err

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError) as caught:
        atomic_save({"w": torch.ones(8)}, tmp_path / "last.pt")
    first_line = str(caught.value).splitlines()[0]
    assert first_line.startswith("[Errno 28] No space left on device while writing")
    assert str(tmp_path / "last.pt") in first_line and "previous last.pt is intact" in first_line
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "last.pt", weights_only=True)["w"], torch.ones(4))
    assert os.listdir(tmp_path) == ["last.pt"]
