"""Train a segmentor on a geospatial foundation model, or evaluate a finished run.

    python run.py                                        # the demo
    torchrun --nproc_per_node=2 run.py encoder=vit_b16 dataset=demo finetune=deflect
    python run.py eval_dir=work_dirs/<run>                # re-evaluate a run on its test split

Method: DEFLECT (Thoreau, Marsocci & Derksen, ICCV 2025, arXiv:2503.09493).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from deflect.engine import build
from deflect.engine.checkpoint import (
    atomic_write_text,
    check_fingerprint,
    load_checkpoint,
    load_trainable_state,
)
from deflect.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)
from deflect.engine.evaluator import AUTOCAST_DTYPES, Evaluator
from deflect.engine.logging import ScalarWriter, metric_scalars, metrics_table, setup_logging
from deflect.engine.outputs import PredictionWriter
from deflect.engine.trainer import Trainer
from deflect.engine.workdir import choose_work_dir, eval_config, resume_config_changes

log = logging.getLogger("run")


def test_and_report(
    cfg: DictConfig, model, work_dir: Path, info: DistInfo, out_name: str, dataset=None
) -> dict:
    """Load ``best.pt``, evaluate the test split, write metrics, panels and GeoTIFFs."""
    best = work_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        raise FileNotFoundError(
            f"{work_dir} has no checkpoints/best.pt (the run never finished an epoch); "
            f"continue it with resume=true work_dir={work_dir}"
        )
    state = load_checkpoint(best)
    check_fingerprint(model, state["frozen_fingerprint"], str(best))
    load_trainable_state(model, state["model"], str(best))
    dataset = dataset if dataset is not None else build.build_dataset(cfg, "test")
    writer = PredictionWriter(
        dataset,
        work_dir,
        list(cfg.encoder.rgb_bands),
        int(cfg.num_vis),
        bool(cfg.save_predictions),
        info.is_main,
    )
    evaluator = Evaluator(
        dataset.num_classes,
        dataset.classes,
        dataset.ignore_index,
        int(cfg.img_size),
        cfg.eval_stride,
        cfg.precision,
        info,
    )
    loader = build.build_loader(dataset, cfg, info, train=False)
    metrics = evaluator.evaluate(model, loader, desc="test", on_batch=writer)
    if info.is_main:
        metrics["checkpoint_epoch"] = int(state["epoch"]) + 1
        atomic_write_text(json.dumps(metrics, indent=2), work_dir / out_name)
        writer.save_png(work_dir / "test_predictions.png")
        log.info(
            "test metrics (%s, best epoch %d)\n%s",
            work_dir.name,
            state["epoch"] + 1,
            metrics_table(metrics, f"test: {work_dir.name}"),
        )
    return metrics


def train(cfg: DictConfig, info: DistInfo) -> None:
    """Train, keep the best checkpoint, test it, export the adapter."""
    # Rank 0 alone decides (and creates) the run folder; the others receive its path.
    chosen = choose_work_dir(cfg, HydraConfig.get().runtime.choices) if info.is_main else None
    work_dir = Path(broadcast_object(chosen, info))
    setup_logging(work_dir, info.is_main)
    last = work_dir / "checkpoints" / "last.pt"
    resuming = bool(cfg.resume) and last.is_file()
    if info.is_main:
        saved = work_dir / "config.yaml"
        if resuming and saved.is_file():
            changes = resume_config_changes(OmegaConf.load(saved), cfg)
            if changes:
                log.warning(
                    "resuming %s with settings that differ from its saved config.yaml; the rest "
                    "of the run uses the new ones:\n  %s",
                    work_dir,
                    "\n  ".join(changes),
                )
        atomic_write_text(OmegaConf.to_yaml(cfg, resolve=True), saved)
        log.info("run folder: %s", work_dir)
    # All three splits are listed now, so a missing or empty test split fails before training.
    datasets = {split: build.build_dataset(cfg, split) for split in build.SPLITS}
    train_set = datasets["train"]
    model = build.build_model(cfg, train_set.bands, train_set.num_classes).to(info.device)
    counts = build.parameter_counts(model)
    if info.is_main:
        atomic_write_text(json.dumps(counts, indent=2), work_dir / "params.json")
        log.info("bands:\n%s", build.band_table(model, train_set.bands))
        log.info(
            "parameters: encoder %s trainable (%.3f%% of the GFM's %s), decoder %s trainable; "
            "total %s trainable of %s",
            f"{counts['encoder_trainable']:,}",
            counts["encoder_trainable_percent"],
            f"{counts['gfm']:,}",
            f"{counts['decoder_trainable']:,}",
            f"{counts['trainable']:,}",
            f"{counts['total']:,}",
        )
    ddp_model = model
    if info.distributed:
        if info.device.type == "cuda":  # SyncBatchNorm only where it can run: multi-GPU DDP
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    generator = torch.Generator()
    train_loader = build.build_loader(train_set, cfg, info, train=True, generator=generator)
    val_loader = build.build_loader(datasets["val"], cfg, info, train=False)
    optimizer = build.build_optimizer(cfg, model)
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(cfg.max_steps_per_epoch))
    scheduler = build.build_scheduler(cfg, optimizer, int(cfg.epochs) * steps_per_epoch)
    writer = ScalarWriter(work_dir / "tensorboard" if info.is_main else None)
    trainer = Trainer(
        model=ddp_model,
        raw_model=model,
        loss_fn=build.build_loss(cfg, train_set.num_classes),
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        loader_generator=generator,
        evaluator=Evaluator(
            train_set.num_classes,
            train_set.classes,
            train_set.ignore_index,
            int(cfg.img_size),
            cfg.eval_stride,
            cfg.precision,
            info,
        ),
        val_loader=val_loader,
        work_dir=work_dir,
        epochs=int(cfg.epochs),
        precision=cfg.precision,
        grad_clip=float(cfg.grad_clip),
        info=info,
        writer=writer,
        seed=int(cfg.seed),
        ignore_index=train_set.ignore_index,
        monitor=cfg.monitor,
        log_interval=int(cfg.log_interval),
        max_steps_per_epoch=cfg.max_steps_per_epoch,
        stop_after_epochs=cfg.stop_after_epochs,
    )
    if resuming:
        trainer.resume(last)
    start = time.time()
    finished = trainer.fit()
    barrier(info)
    if not finished:
        log.info(
            "stopped after epoch %d as asked (stop_after_epochs); continue with "
            "resume=true work_dir=%s",
            cfg.stop_after_epochs,
            work_dir,
        )
        writer.close()
        return
    metrics = test_and_report(cfg, model, work_dir, info, "metrics_test.json", datasets["test"])
    if info.is_main:
        best_val = json.loads((work_dir / "best_val_metrics.json").read_text())
        summary = {
            "best_val": best_val,
            "test": metrics,
            "params": counts,
            "train_seconds": round(time.time() - start, 1),
        }
        atomic_write_text(json.dumps(summary, indent=2), work_dir / "metrics.json")
        writer.scalars(metric_scalars("test", metrics), int(cfg.epochs))
        if hasattr(model.encoder, "save_pretrained"):
            model.encoder.save_pretrained(work_dir / "adapter")
        log.info("done: test mIoU %.2f; everything is in %s", 100 * metrics["mIoU"], work_dir)
    writer.close()


def evaluate(cfg: DictConfig, info: DistInfo) -> None:
    """Re-evaluate a finished run on its test split from its saved config and best checkpoint."""
    work_dir = Path(cfg.eval_dir).expanduser()
    run_cfg = eval_config(work_dir, HydraConfig.get().overrides.task)
    setup_logging(None, info.is_main)
    dataset = build.build_dataset(run_cfg, "test")
    model = build.build_model(run_cfg, dataset.bands, dataset.num_classes).to(info.device)
    test_and_report(run_cfg, model, work_dir, info, "test_metrics.json", dataset)


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Entry point: one process or one torchrun rank."""
    if cfg.precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision={cfg.precision!r} is not one of {list(AUTOCAST_DTYPES)}")
    info = init_distributed(cfg.device)
    try:
        if cfg.eval_dir:
            evaluate(cfg, info)
        else:
            train(cfg, info)
        # Every rank is done with collectives before the group goes away (a rank tearing gloo
        # down while another still works aborts the process). Not on errors: a failing rank
        # must exit, never wait here for the others.
        barrier(info)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    main()
