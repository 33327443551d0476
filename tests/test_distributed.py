"""DDP (gloo on CPU): gradients equal the mean of single-process gradients on each half of the
batch, and evaluation under torchrun counts every pixel exactly once."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deflect.engine import build
from deflect.engine.distributed import barrier, cleanup_distributed, init_distributed
from tests.conftest import REPO, TINY, run_cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_spec(cfg):
    """The demo's data description, as the dataset builds it."""
    return build.build_dataset(cfg, "train").spec


def tiny_config(finetune: str, demo_root: Path, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[*TINY, f"finetune={finetune}", f"dataset.root={demo_root}",
                       "segmentor.dropout=0", *extra],
        )  # fmt: skip
    return OmegaConf.to_container(cfg, resolve=True)


def loss_and_grads(model, loss_fn, images, masks) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model(images), masks).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def ddp_worker(rank: int, world: int, port: int, cfg: dict, batch_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        cfg = OmegaConf.create(cfg)
        model = build.build_model(cfg, demo_spec(cfg))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, masks = torch.load(batch_path, weights_only=True)
        half = slice(rank * 2, rank * 2 + 2)
        loss = build.build_loss(cfg, demo_spec(cfg))(ddp(images[half]), masks[half])
        loss.backward()
        if info.rank == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            torch.save(grads, out)
        del ddp  # release the reducer before the group goes away
        barrier(info)  # both ranks done before either tears gloo down
    finally:
        cleanup_distributed()


@pytest.mark.parametrize(
    ("finetune", "recompute"),
    [
        # slow: DDP's gradient rule is the same for every method; deflect stays in the default suite
        pytest.param("full", False, marks=pytest.mark.slow),
        ("deflect", False),
        # slow: recomputation alone is tested for every method in tests/test_tuner_matrix.py
        pytest.param("deflect", True, marks=pytest.mark.slow),
    ],
    ids=["full", "deflect", "deflect-activation_checkpointing"],
)
def test_ddp_gradients_equal_mean_of_half_batch_gradients(finetune, recompute, demo_root, tmp_path):
    """DDP's gradients are the mean of each half batch's; with activation checkpointing in the
    DDP ranks, still those of the plain model."""
    cfg = tiny_config(finetune, demo_root, f"activation_checkpointing={recompute}")
    torch.manual_seed(1)
    images, masks = torch.randn(4, 4, 32, 32), torch.randint(0, 4, (4, 32, 32))
    torch.save((images, masks), tmp_path / "batch.pt")
    mp.spawn(ddp_worker, args=(2, free_port(), cfg, str(tmp_path / "batch.pt"),
                               str(tmp_path / "grads.pt")), nprocs=2, join=True)  # fmt: skip
    ddp_grads = torch.load(tmp_path / "grads.pt", weights_only=True)

    cfg["activation_checkpointing"] = False
    model = build.build_model(OmegaConf.create(cfg), demo_spec(OmegaConf.create(cfg)))
    loss_fn = build.build_loss(OmegaConf.create(cfg), demo_spec(OmegaConf.create(cfg)))
    first = loss_and_grads(model, loss_fn, images[:2], masks[:2])
    second = loss_and_grads(model, loss_fn, images[2:], masks[2:])
    assert set(ddp_grads) == set(first) and len(first) > 0
    for name, grad in ddp_grads.items():
        expected = (first[name] + second[name]) / 2
        assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-4), name


def test_torchrun_trains_and_evaluates_each_pixel_once(demo_root, tmp_path):
    run_cli([*TINY, f"dataset.root={demo_root}", "epochs=1", "batch_size=2"], tmp_path, nproc=2)
    runs = list((tmp_path / "work_dirs").iterdir())
    assert len(runs) == 1, runs  # rank 0 alone names the run folder
    work_dir = runs[0]
    reported = json.loads((work_dir / "metrics.json").read_text())["test"]
    assert reported["pixels"] == 64 * 300  # the whole test strip, each pixel once
    run_cli([f"eval_dir={work_dir}"], tmp_path)  # one process
    single = json.loads((work_dir / "test_metrics.json").read_text())
    assert single["confusion_matrix"] == reported["confusion_matrix"]


@pytest.mark.slow  # torchrun itself: test_torchrun_trains_and_evaluates_each_pixel_once
def test_torchrun_multirun_keeps_one_sweep_folder_and_one_process_group(demo_root, tmp_path):
    """Every rank names the same sweep folder (the launch's time stamp), and the second job
    reuses the process group of the first."""
    run_cli(["-m", "finetune=frozen,bitfit", *TINY, f"dataset.root={demo_root}", "epochs=1",
             "batch_size=2", "save_predictions=false"], tmp_path, nproc=2)  # fmt: skip
    sweeps = list((tmp_path / "work_dirs" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    runs = sorted(p.name for p in sweeps[0].iterdir() if p.is_dir())
    assert runs == ["000_tiny_vit_frozen_demo", "001_tiny_vit_bitfit_demo"]
    for name in runs:
        summary = json.loads((sweeps[0] / name / "metrics.json").read_text())
        assert summary["test"]["pixels"] == 64 * 300  # each test pixel once, over both ranks
        assert summary["train_images"] == 3 * 2 * 2  # 3 steps x 2 images x 2 ranks


@pytest.mark.slow
def test_an_error_on_another_rank_than_0_reaches_the_run_folder(demo_root, tmp_path):
    """Rank 1 alone meets a corrupt validation image (the evaluation sampler gives it sample
    1): failed.txt starts with its error naming the file, not with rank 0's "connection closed"
    that follows, and train.log has it too."""
    import shutil

    data = tmp_path / "demo"
    shutil.copytree(demo_root, data)
    bad = sorted((data / "val").glob("*_image.tif"))[1]
    bad.write_bytes(b"this is not a GeoTIFF")
    work_dir = tmp_path / "run"
    proc = run_cli([*TINY, f"dataset.root={data}", f"work_dir={work_dir}", "epochs=1",
                    "check_reflectance_scale=false"], tmp_path, nproc=2, check=False)  # fmt: skip
    assert proc.returncode != 0
    failed = (work_dir / "failed.txt").read_text()
    assert failed.splitlines()[0].startswith(f"OSError: cannot read GeoTIFF '{bad}'"), failed[:300]
    assert "rank 1 of 2" in failed
    assert (
        f"ERROR rank 1: OSError: cannot read GeoTIFF '{bad}'"
        in (work_dir / "train.log").read_text()
    )


@pytest.mark.slow
def test_a_stalled_rank_is_named_when_the_timeout_fires(demo_root, tmp_path):
    """Rank 1 is stopped (SIGSTOP) while training: rank 0 gives up after dist_timeout and the
    run folder says which rank stalled and what it was doing."""
    import signal
    import subprocess
    import sys
    import time

    work_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "run.py"), *TINY, f"dataset.root={demo_root}", f"work_dir={work_dir}",
           "epochs=200", "max_steps_per_epoch=null", "dist_timeout=10"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    rank1 = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            log = work_dir / "train.log"
            if log.is_file() and "epoch 1/200" in log.read_text():
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the run never finished its first epoch")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if (
                b"RANK=1" in environ
                and f"work_dir={work_dir}".encode() in open(f"/proc/{pid}/cmdline", "rb").read()
            ):
                rank1 = int(pid)
        assert rank1 is not None
        os.kill(rank1, signal.SIGSTOP)
        deadline = time.time() + 90
        while time.time() < deadline and not (work_dir / "failed.txt").is_file():
            time.sleep(0.5)
        failed = (work_dir / "failed.txt").read_text()
    finally:
        if rank1 is not None:
            os.kill(rank1, signal.SIGKILL)
        launcher.kill()
        launcher.wait()
    head = failed.splitlines()[0]
    assert head.startswith(f"stalled rank: rank 1 (pid {rank1} on "), failed[:500]
    assert "at: training, epoch" in head and "dist_timeout=10 s" in head
