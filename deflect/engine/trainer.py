"""The Trainer: one class, read top to bottom, no callbacks, for any task (the run's
:class:`~deflect.tasks.Task` gives a batch's target, whether it holds a training signal, and
what is logged).

Per step: autocast forward, loss (+ any auxiliary loss the encoder reports, e.g. DEFLECT's soft
deflection), backward (through a GradScaler for fp16 only), gradient clipping, optimiser and
per-step scheduler. Per epoch: validation (every ``val_every``-th epoch and the last),
``best.pt`` when the monitored metric improves, ``last.pt`` always (both written atomically). ``resume`` restores model, optimiser, scheduler,
scaler, epoch and RNG state, and every epoch re-seeds its randomness from (seed, epoch, rank), so a
resumed run ends exactly where an uninterrupted one does. Early stopping (``patience`` validations
without an improvement of the monitored metric by more than ``min_delta``) keeps its count in
``last.pt`` too, so a resumed run stops at the same epoch.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from deflect.engine.checkpoint import (
    atomic_save,
    atomic_write_text,
    frozen_fingerprint,
    load_checkpoint,
    load_model_state,
    rng_state,
    set_rng_state,
    trainable_state_dict,
)
from deflect.engine.distributed import DistInfo, all_reduce_max, all_reduce_mean, heartbeat
from deflect.engine.evaluator import Evaluator, autocast_context, batch_metadata
from deflect.engine.logging import ScalarWriter
from deflect.engine.meter import PeakMemory, ThroughputMeter
from deflect.engine.train_settings import (
    MAX_BAD_STEPS,
    MAX_BAD_STEPS_FP16,
    TrainSettings,
    seed_epoch,
)
from deflect.tasks.base import Task

log = logging.getLogger(__name__)
#: The log line's mark of a validation made only for the record (before a stop_after_epochs exit).
RECORD_ONLY = "  (before stopping; not counted for best.pt or the patience)"
#: Importable from here as before (:mod:`deflect.engine.train_settings`).
__all__ = ["MAX_BAD_STEPS", "MAX_BAD_STEPS_FP16", "TrainSettings", "Trainer", "seed_epoch"]


class Trainer:
    """Trains a model for the run's task and keeps its best and last checkpoints.

    Args:
        model: the model to step (DDP-wrapped under torchrun).
        raw_model: the same model unwrapped (for state dicts, evaluation, auxiliary losses).
        task: what is predicted: the batch's target, whether it holds any signal, what is logged.
        settings: epochs, precision, clipping, seed, ...
        loss_fn: the task's loss ``(output, target) -> scalar``.
        optimizer: optimiser over the trainable parameters only.
        scheduler: per-step learning-rate scheduler.
        train_loader: training batches; its sampler gets ``set_epoch`` when it has one.
        loader_generator: the loader's generator, re-seeded each epoch.
        evaluator: validation metrics.
        val_loader: validation batches (each sample once across ranks).
        work_dir: the run's folder.
        info: rank, world size and device.
        writer: TensorBoard scalars.
    """

    def __init__(
        self,
        model: nn.Module,
        raw_model: nn.Module,
        task: Task,
        settings: TrainSettings,
        loss_fn: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: torch.utils.data.DataLoader,
        loader_generator: torch.Generator | None,
        evaluator: Evaluator,
        val_loader: torch.utils.data.DataLoader,
        work_dir: Path,
        info: DistInfo,
        writer: ScalarWriter,
    ) -> None:
        self.model, self.raw_model, self.task, self.settings = model, raw_model, task, settings
        self.loss_fn, self.optimizer, self.scheduler = loss_fn, optimizer, scheduler
        self.train_loader, self.loader_generator = train_loader, loader_generator
        self.evaluator, self.val_loader = evaluator, val_loader
        self.work_dir, self.info, self.writer = work_dir, info, writer
        self.params = [p for p in raw_model.parameters() if p.requires_grad]
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=settings.precision == "fp16")
        self.start_epoch = 0
        self.global_step = 0
        # The monitored metric's values as stored (best.pt, last.pt, the log): the worst value
        # until an epoch is scored. Comparisons go through _better, so lower-is-better works too.
        worst = -math.inf if settings.higher_is_better else math.inf
        self.best_score = worst
        self.best_epoch = -1
        self.best_metrics: dict | None = None
        # Early stopping: the score the patience counts from, and epochs since it was set.
        self.patience_score = worst
        self.epochs_without_improvement = 0
        self.stopped_early_at: int | None = None  # the last epoch trained (1-based), if stopped
        self.fingerprint = frozen_fingerprint(raw_model)
        data = getattr(raw_model, "data", None)
        self.manifest = json.dumps(data.to_dict()) if data is not None else ""
        encoder = getattr(raw_model, "encoder", None)
        roles = encoder.band_roles() if hasattr(encoder, "band_roles") else {}
        self.band_roles = json.dumps(
            roles
        )  # which bands feed the pretrained layers, which the adapter
        self.throughput = ThroughputMeter()
        self.memory = PeakMemory(info.device)
        self.started_at = time.time()
        self.elapsed_before = 0.0  # wall time of the run before a resume

    def cost(self) -> dict:
        """Training images, seconds and images per second (all ranks) and peak memory (largest
        rank) over every epoch of the run, those before a resume included, for
        ``metrics.json``."""
        rate = self.throughput.images_per_second
        return {
            "train_seconds": round(self.elapsed_before + time.time() - self.started_at, 1),
            "train_images": self.throughput.images,
            "train_images_per_s": round(rate, 2) if rate is not None else None,
            "peak_memory_mb": round(all_reduce_max(self.memory.peak_mib, self.info), 1),
            "peak_memory_kind": self.memory.kind,
        }

    def _cost_state(self) -> dict:
        """What :meth:`cost` needs to carry across a resume (stored in ``last.pt``)."""
        return {
            "images": self.throughput.images,
            "seconds": self.throughput.seconds,
            "peak_memory_mb": self.memory.peak_mib,
            "elapsed": self.elapsed_before + time.time() - self.started_at,
        }

    @property
    def checkpoint_dir(self) -> Path:
        """Where ``best.pt`` and ``last.pt`` live."""
        return self.work_dir / "checkpoints"

    def resume(self, path: Path) -> None:
        """Restore the full training state from ``last.pt``."""
        state = load_checkpoint(path)
        load_model_state(self.raw_model, state, str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.start_epoch = state["epoch"] + 1
        self.global_step = state["global_step"]
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_metrics = json.loads(state["best_metrics"]) if state["best_metrics"] else None
        stopping = state.get("early_stopping")
        if stopping:
            self.patience_score = float(stopping["score"])
            self.epochs_without_improvement = int(stopping["epochs_without_improvement"])
            self.stopped_early_at = stopping["stopped_at_epoch"]
        cost = state.get("cost")
        if cost:  # the resumed run reports the whole run's cost, not only its own epochs
            self.throughput.images = int(cost["images"])
            self.throughput.seconds = float(cost["seconds"])
            self.memory.floor(float(cost["peak_memory_mb"]))
            self.elapsed_before = float(cost["elapsed"])
        if self.start_epoch >= self.settings.epochs:
            log.info("resumed from %s: all %d epochs were trained; testing the best checkpoint",
                     path, self.settings.epochs)  # fmt: skip
        else:
            log.info("resumed from %s: continuing at epoch %d of %d", path,
                     self.start_epoch + 1, self.settings.epochs)  # fmt: skip

    def early_stopping_record(self) -> dict:
        """For ``metrics.json``: the patience, the min_delta, and the epoch training stopped at
        (``None`` when it ran every epoch, or without early stopping)."""
        return {
            "early_stopping": {
                "patience": self.settings.early_stopping_patience or None,
                "min_delta": self.settings.early_stopping_min_delta,
                "stopped_at_epoch": self.stopped_early_at,
                "epochs": self.settings.epochs,
            }
        }

    def _better(self, score: float, reference: float, margin: float = 0.0) -> bool:
        """Whether ``score`` beats ``reference`` by more than ``margin`` in the monitored
        metric's direction (NaN never does)."""
        if self.settings.higher_is_better:
            return score > reference + margin
        return score < reference - margin

    def _patience_over(self, epoch: int, score: float) -> bool:
        """Count a validation without improvement by more than min_delta; True (and logged)
        when the patience is used up."""
        patience = self.settings.early_stopping_patience
        if self._better(score, self.patience_score, self.settings.early_stopping_min_delta):
            self.patience_score, self.epochs_without_improvement = score, 0
        else:
            self.epochs_without_improvement += 1
        if not patience or self.epochs_without_improvement < patience:
            return False
        self.stopped_early_at = epoch + 1
        if self.info.is_main:
            log.info(
                "early stopping after epoch %d of %d: val %s has not improved by more than %g "
                "for %d validations (best %.4f at epoch %d); testing the best checkpoint",
                epoch + 1, self.settings.epochs, self.settings.monitor,
                self.settings.early_stopping_min_delta, patience, self.best_score,
                self.best_epoch + 1,
            )  # fmt: skip
        return True

    def validates(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) is validated for best.pt and the patience: every
        ``val_every``-th epoch and the run's last."""
        return (epoch + 1) % self.settings.val_every == 0 or epoch + 1 == self.settings.epochs

    def _log_epoch_scalars(self, epoch: int, train_loss: float) -> None:
        """The epoch's training loss and throughput in TensorBoard (rank 0)."""
        self.writer.scalars({"train/epoch_loss": train_loss}, epoch + 1)
        if self.throughput.images_per_second is not None:
            self.writer.scalars(
                {"train/images_per_s": self.throughput.images_per_second}, epoch + 1
            )

    def fit(self) -> bool:
        """Train the remaining epochs; True when the run is done (every epoch trained, or
        stopped early), False when ``stop_after_epochs`` left it unfinished."""
        last_epoch = self.settings.epochs
        if self.settings.stop_after_epochs is not None:
            last_epoch = min(self.settings.epochs, self.settings.stop_after_epochs)
        # Resumed after it had stopped early (and died before testing): nothing left to train.
        first = self.start_epoch if self.stopped_early_at is None else last_epoch
        for epoch in range(first, last_epoch):
            seed_epoch(self.settings.seed, epoch, self.info.rank, self.loader_generator)
            sampler = getattr(self.train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            train_loss = self.train_one_epoch(epoch)
            counts = self.validates(epoch)
            # The last epoch before a stop_after_epochs exit is validated for the record (log,
            # TensorBoard) but counts for nothing: a resumed run keeps best.pt and the patience
            # exactly where an uninterrupted one has them.
            if not counts and epoch + 1 < last_epoch:
                if self.info.is_main:
                    self._log_epoch_scalars(epoch, train_loss)
                    log.info("epoch %d/%d  train loss %.4f  (not validated: val_every=%d)",
                             epoch + 1, self.settings.epochs, train_loss,
                             self.settings.val_every)  # fmt: skip
                    self.save_last(epoch)
                continue
            metrics = self.evaluator.evaluate(
                self.raw_model, self.val_loader, desc=f"val {epoch + 1}/{self.settings.epochs}"
            )
            score = metrics[self.settings.monitor]
            improved = counts and self._better(score, self.best_score)
            if improved:
                self.best_score, self.best_epoch, self.best_metrics = score, epoch, metrics
            if self.info.is_main:
                self.writer.scalars(self.task.scalars("val", metrics), epoch + 1)
                self._log_epoch_scalars(epoch, train_loss)
                log.info(
                    "epoch %d/%d  train loss %.4f  val %s%s",
                    epoch + 1,
                    self.settings.epochs,
                    train_loss,
                    self.task.log_line(metrics),
                    "  (best)" if improved else "" if counts else RECORD_ONLY,
                )
                if improved:
                    atomic_save(
                        {
                            "model": trainable_state_dict(self.raw_model),
                            "frozen_fingerprint": self.fingerprint,
                            "data": self.manifest,
                            "band_roles": self.band_roles,
                            "epoch": epoch,
                            "metrics": json.dumps(metrics),
                        },
                        self.checkpoint_dir / "best.pt",
                    )
            # every rank: the same all-reduced score
            stop = counts and self._patience_over(epoch, score)
            if self.info.is_main:
                self.save_last(epoch)
            if stop:
                break
        if self.info.is_main and self.best_metrics is not None:
            atomic_write_text(
                json.dumps({"epoch": self.best_epoch + 1, **self.best_metrics}, indent=2),
                self.work_dir / "best_val_metrics.json",
            )
        return self.stopped_early_at is not None or last_epoch == self.settings.epochs

    def train_one_epoch(self, epoch: int) -> float:
        """One pass over the training loader; returns the mean loss over ranks."""
        self.model.train()
        total = torch.zeros((), device=self.info.device)
        steps = 0
        bad_steps = 0
        n_batches = len(self.train_loader)
        if self.settings.max_steps_per_epoch:
            n_batches = min(n_batches, self.settings.max_steps_per_epoch)
        bar = tqdm(
            self.train_loader,
            total=n_batches,
            desc=f"train {epoch + 1}/{self.settings.epochs}",
            disable=not self.info.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        seen = 0
        self.throughput.start()
        for batch in bar:
            if steps >= n_batches:
                break
            heartbeat(f"training, epoch {epoch + 1} step {steps + 1}", self.info)
            images = batch["image"].to(self.info.device, non_blocking=True)
            seen += images.shape[0]
            # Asked of the target still on the host: on a GPU, asking the device copy would
            # wait for the forward pass to finish before the backward pass could be queued.
            labelled = self.task.has_signal(batch, self.evaluator.data)
            target = self.task.target(batch).to(self.info.device, non_blocking=True)
            metadata = batch_metadata(self.raw_model, batch, self.info.device)
            with autocast_context(self.info.device, self.settings.precision):
                logits = self.model(images, **metadata)
            if labelled:
                loss = self.loss_fn(logits, target)
            else:  # a batch without labels: no signal, but keep every rank's graph alike
                loss = logits.float().sum() * 0.0
            aux = self.raw_model.auxiliary_losses() if self.model.training else {}
            objective = loss + sum(aux.values()) if aux else loss

            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(objective).backward()
            self.scaler.unscale_(self.optimizer)
            clip = self.settings.grad_clip
            max_norm = clip if clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if torch.isfinite(grad_norm):  # gradients are all-reduced: every rank agrees
                bad_steps = 0
            else:
                bad_steps += 1
                limit = MAX_BAD_STEPS_FP16 if self.scaler.is_enabled() else MAX_BAD_STEPS
                if bad_steps >= limit:
                    raise RuntimeError(
                        f"non-finite loss or gradients for {bad_steps} steps in a row at epoch "
                        f"{epoch + 1}: lower optimizer.lr, use precision=fp32 or bf16, or check "
                        "the data for NaN/inf values"
                    )
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)  # skips the step itself on inf/NaN gradients
                self.scaler.update()
            elif torch.isfinite(grad_norm):
                self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            steps += 1
            total += loss.detach()
            self.memory.sample()
            if self.info.is_main:
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if self.global_step % self.settings.log_interval == 0 or steps == n_batches:
                    scalars = {
                        "train/loss": loss.item(),
                        "train/lr": self.optimizer.param_groups[0]["lr"],
                        "train/grad_norm": grad_norm.item(),
                    }
                    scalars.update({f"train/{k}": v.item() for k, v in aux.items()})
                    self.writer.scalars(scalars, self.global_step)
        # Every rank trains the same number of full batches (DistributedSampler, drop_last).
        self.throughput.stop(seen * self.info.world_size, self.info.device)
        return float(all_reduce_mean(total / max(steps, 1), self.info))

    def save_last(self, epoch: int) -> None:
        """The full training state after ``epoch`` (rank 0 writes it, with its RNG state; every
        epoch re-seeds all ranks from (seed, epoch, rank), so other ranks need none)."""
        atomic_save(
            {
                "model": trainable_state_dict(self.raw_model),
                "frozen_fingerprint": self.fingerprint,
                "data": self.manifest,
                "band_roles": self.band_roles,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": epoch,
                "global_step": self.global_step,
                "best_score": self.best_score,
                "best_epoch": self.best_epoch,
                "best_metrics": json.dumps(self.best_metrics) if self.best_metrics else "",
                "rng": rng_state(),
                "cost": self._cost_state(),
                "early_stopping": {
                    "score": self.patience_score,
                    "epochs_without_improvement": self.epochs_without_improvement,
                    "stopped_at_epoch": self.stopped_early_at,
                },
                "saved_at": time.time(),
            },
            self.checkpoint_dir / "last.pt",
        )
