"""Build every component from the composed config: the one place ``instantiate`` is called.

Components take plain typed arguments; only this module reads the config tree. The run's
:class:`~deflect.tasks.Task` is built once (:func:`build_task`) and handed to every builder
that depends on what is predicted (transform, head, loss, monitor, evaluator, trainer); each
builder builds it from the config only when a caller (a script, a test) gives none. The
dataset's :class:`~deflect.data.DataSpec` is built once (by the dataset) and handed to the
encoder, the tuner (through the encoder), the transforms, the evaluator and the outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from deflect.data import DataSpec
from deflect.engine.distributed import DistInfo, ShardSampler, distribute
from deflect.engine.evaluator import Evaluator
from deflect.engine.logging import ScalarWriter
from deflect.engine.trainer import Trainer, TrainSettings
from deflect.tasks import InferenceSettings, Task
from deflect.tasks import build_task as task_from_node
from deflect.tasks.weights import class_weights as weights_from_setting
from deflect.tasks.weights import median_frequency_weights

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Keys of a dataset YAML that describe the run, not the dataset object.
RUN_HINTS = ("img_size", "class_frequencies")
# Re-exported: the weights' rules live with the tasks' losses.
__all__ = ["class_weights", "median_frequency_weights"]


def build_task(cfg: DictConfig) -> Task:
    """The run's task, from the ``task`` group (``configs/task/``; :mod:`deflect.tasks`)."""
    node = cfg.get("task")
    return task_from_node(None if node is None else OmegaConf.to_container(node, resolve=True))


def build_dataset(cfg: DictConfig, split: str, band_stats=None, task: Task | None = None):
    """The dataset of ``split`` with the task's transform (augmentation only for training).
    ``band_stats`` given replaces the dataset's own (which are then neither read nor
    computed)."""
    node = OmegaConf.to_container(cfg.dataset, resolve=True)
    for key in RUN_HINTS:  # e.g. the dataset's native tile size, read as ${dataset.img_size}
        node.pop(key, None)
    if band_stats is not None:
        node.pop("band_stats", None)
        dataset = instantiate(node, split=split, band_stats=band_stats, _convert_="all")
    else:
        dataset = instantiate(node, split=split, _convert_="all")
    if bool(cfg.get("check_reflectance_scale", True)):
        dataset.check_reflectance_scale()
    task = task or build_task(cfg)
    aug = cfg.augmentation
    augmentation = {"hflip": float(aug.hflip), "vflip": float(aug.vflip),
                    "rot90": bool(aug.rot90),
                    "min_labelled_fraction": float(aug.min_labelled_fraction)}  # fmt: skip
    dataset.transform = task.transform(dataset.spec, split == "train", int(cfg.img_size),
                                       augmentation)  # fmt: skip
    task.check_inputs(dataset, int(cfg.img_size))
    return dataset


def build_datasets(cfg: DictConfig, task: Task) -> dict:
    """All three splits, listed now so a missing or empty split fails before training."""
    return {split: build_dataset(cfg, split, task=task) for split in SPLITS}


def build_loader(
    dataset, cfg: DictConfig, info: DistInfo, train: bool, generator: torch.Generator | None = None
) -> torch.utils.data.DataLoader:
    """Training loader (shuffled, sharded by DistributedSampler, full batches) or an evaluation
    loader (each sample exactly once across ranks)."""
    if train:
        if info.distributed:
            sampler = torch.utils.data.DistributedSampler(
                dataset,
                info.world_size,
                info.rank,
                shuffle=True,
                seed=int(cfg.seed),
                drop_last=True,
            )
        else:
            sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
        batch_size = int(cfg.batch_size)
        if len(sampler) < batch_size:
            raise ValueError(
                f"the training split has {len(sampler)} samples per process, fewer than "
                f"batch_size={batch_size}; lower batch_size"
            )
    else:
        sampler = ShardSampler(len(dataset), info.rank, info.world_size)
        batch_size = int(cfg.eval_batch_size)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=int(cfg.num_workers),
        drop_last=train,
        pin_memory=info.device.type == "cuda",
        generator=generator,
        persistent_workers=False,  # persistent workers grew memory without bound in a peer
    )


def build_model(cfg: DictConfig, data: DataSpec, task: Task | None = None) -> nn.Module:
    """Encoder (told what the data hold) -> fine-tuning method -> the task's head (from the
    ``segmentor`` group where the task uses it).

    Each part is seeded on its own, so frozen random weights are repeatable and every method
    starts from the same encoder and the same decoder: an ablation compares methods, not seeds.
    """
    from deflect.tuners import get_deflect_model

    seed = int(cfg.seed)
    torch.manual_seed(seed)
    # Partial, then called: Hydra would turn the DataSpec dataclass into a plain dict.
    encoder = instantiate(cfg.encoder, _partial_=True, _convert_="all")(data=data)
    torch.manual_seed(seed + 1)
    encoder = get_deflect_model(encoder, instantiate(cfg.finetune, _convert_="all"))
    if bool(cfg.get("activation_checkpointing", False)):
        encoder.set_activation_checkpointing(True)
    torch.manual_seed(seed + 2)
    return (task or build_task(cfg)).build_model(encoder, data, cfg.get("segmentor"))


def class_weights(cfg: DictConfig, data: DataSpec) -> list[float] | None:
    """``loss.class_weights``: a list, null, or ``median_frequency`` (from the dataset YAML's
    ``class_frequencies``, e.g. MADOS's published ones)."""
    setting = (cfg.get("loss") or {}).get("class_weights")
    return weights_from_setting(setting, data, cfg.dataset.get("class_frequencies"))


def build_loss(cfg: DictConfig, data: DataSpec, task: Task | None = None) -> nn.Module:
    """The task's loss from the ``loss`` group (class weights, dice, label smoothing, ...)."""
    loss = cfg.get("loss") or {}
    return (task or build_task(cfg)).build_loss(loss, data, cfg.dataset.get("class_frequencies"))


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimiser over trainable parameters, in four groups: encoder (adapters, or the whole
    ViT under ``full``) at ``encoder_lr_scale`` x lr, decoder at lr; no weight decay on biases,
    norms and tokens."""
    optimizer = instantiate(cfg.optimizer, _convert_="all")
    base_lr = float(cfg.optimizer.lr)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = (name.startswith("encoder."), param.ndim >= 2)
            groups.setdefault(key, []).append(param)
    if not groups:
        raise ValueError("the model has no trainable parameters; check the finetune config")
    scale = float(cfg.encoder_lr_scale)
    return optimizer(
        [
            {
                "params": params,
                "lr": base_lr * (scale if in_encoder else 1.0),
                **({} if decay else {"weight_decay": 0.0}),
            }
            for (in_encoder, decay), params in sorted(groups.items())
        ]
    )


def build_scheduler(cfg: DictConfig, optimizer, total_steps: int):
    """The per-step learning-rate schedule."""
    return instantiate(cfg.scheduler, _convert_="all")(optimizer, total_steps=total_steps)


def train_settings(cfg: DictConfig, task: Task) -> TrainSettings:
    """The trainer's settings from the top-level keys; ``monitor`` null is the task's own
    headline, and the task says whether higher or lower is better."""
    monitor = cfg.get("monitor") or task.headline
    higher_is_better = task.higher_is_better(monitor)  # names the task's monitors if not one
    return TrainSettings(
        epochs=int(cfg.epochs),
        precision=str(cfg.precision),
        grad_clip=float(cfg.grad_clip),
        seed=int(cfg.seed),
        monitor=str(monitor),
        higher_is_better=higher_is_better,
        log_interval=int(cfg.log_interval),
        max_steps_per_epoch=cfg.max_steps_per_epoch,
        stop_after_epochs=cfg.stop_after_epochs,
        early_stopping_patience=cfg.get("early_stopping_patience") or None,
        early_stopping_min_delta=float(cfg.get("early_stopping_min_delta") or 0.0),
        val_every=cfg.get("val_every", 1),
    )


def eval_settings(cfg: DictConfig) -> InferenceSettings:
    """How test images run: window = the encoder input size, stride, precision."""
    stride = int(cfg.eval_stride) if cfg.eval_stride else None
    return InferenceSettings(window=int(cfg.img_size), stride=stride,
                             precision=str(cfg.precision))  # fmt: skip


def build_evaluator(cfg: DictConfig, data: DataSpec, info: DistInfo, task: Task) -> Evaluator:
    """The task's evaluation of a model on a loader."""
    return Evaluator(task, eval_settings(cfg), data, info)


def build_trainer(
    cfg: DictConfig, model: nn.Module, datasets: dict, work_dir: Path, info: DistInfo, task: Task
) -> Trainer:
    """The trainer with everything it steps: (DDP) model, loaders, loss, optimiser, schedule,
    validation, TensorBoard."""
    settings = train_settings(cfg, task)
    task.check_batch_size(int(cfg.batch_size))
    ddp_model = compile_if_asked(distribute(model, info), cfg)
    generator = torch.Generator()
    train_loader = build_loader(datasets["train"], cfg, info, train=True, generator=generator)
    steps_per_epoch = len(train_loader)
    if settings.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(settings.max_steps_per_epoch))
    optimizer = build_optimizer(cfg, model)
    return Trainer(
        model=ddp_model,
        raw_model=model,
        task=task,
        settings=settings,
        loss_fn=build_loss(cfg, model.data, task),
        optimizer=optimizer,
        scheduler=build_scheduler(cfg, optimizer, settings.epochs * steps_per_epoch),
        train_loader=train_loader,
        loader_generator=generator,
        evaluator=build_evaluator(cfg, model.data, info, task),
        val_loader=build_loader(datasets["val"], cfg, info, train=False),
        work_dir=work_dir,
        info=info,
        writer=ScalarWriter(work_dir / "tensorboard" if info.is_main else None),
    )


def compile_if_asked(model: nn.Module, cfg: DictConfig) -> nn.Module:
    """``model`` compiled in place by ``torch.compile`` when ``compile=true`` (parameters and
    state-dict keys unchanged; evaluation keeps the eager model). The first training steps pay
    the compilation."""
    if bool(cfg.get("compile", False)):
        log.info("compile=true: the first training steps compile the model (can take minutes)")
        model.compile()
    return model


def parameter_counts(model: nn.Module) -> dict[str, int | float]:
    """Trainable and total parameters of the encoder (the GFM, adapters counted apart) and of
    the decoder; the percentage is of the GFM's own parameters, as the paper reports it."""
    encoder_trainable, gfm = model.encoder.get_nb_trainable_parameters()
    encoder_total = sum(p.numel() for p in model.encoder.parameters())
    decoder = [p for name, p in model.named_parameters() if not name.startswith("encoder.")]
    decoder_total = sum(p.numel() for p in decoder)
    decoder_trainable = sum(p.numel() for p in decoder if p.requires_grad)
    return {
        "gfm": gfm,
        "adapter": encoder_total - gfm,
        "encoder_total": encoder_total,
        "encoder_trainable": encoder_trainable,
        "encoder_trainable_percent": 100.0 * encoder_trainable / max(gfm, 1),
        "decoder_trainable": decoder_trainable,
        "total": encoder_total + decoder_total,
        "trainable": encoder_trainable + decoder_trainable,
    }


def band_table(model: nn.Module, sources: dict[str, str] | None = None) -> str:
    """What each input band feeds, asked of each part: the encoder (its pretrained patch
    embedding), the fine-tuning method (e.g. DEFLECT's spectral stream) and the pictures. Logged
    at start so nothing is mapped, filled or dropped unseen. ``sources`` (band -> how the files
    name it, e.g. ``Blue``) adds a column when a dataset renamed any band."""
    data: DataSpec = model.data
    encoder = model.encoder
    columns = {}
    if sources and any(sources.get(b, b) != b for b in data.bands):
        columns["in the files"] = {b: sources.get(b, b) for b in data.bands}
    columns |= {
        "encoder": encoder.base_model.band_usage(),
        "fine-tuning method": encoder.adapter_band_usage(),
        "pictures": {b: "RGB"[i] for i, b in enumerate(data.display_bands)},
    }
    rows = [["band", *columns]] + [
        [band, *(column.get(band, "-") for column in columns.values())] for band in data.bands
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    used = [columns["encoder"], columns["fine-tuning method"]]
    unused = [b for b in data.bands if all(b not in c for c in used)]
    if unused:
        lines.append(f"not used by the model: {', '.join(unused)}")
    return "\n".join(lines)
